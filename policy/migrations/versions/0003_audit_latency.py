"""audit: decision latency; an index for one user's rows by time

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit") as batch:
        batch.add_column(sa.Column("latency_ms", sa.Float))
    # `mfa-proxy audit --user U [--since T]`, newest first: one index range, read
    # backwards. It covers every query the single-column index on username served.
    op.create_index("ix_audit_user_time", "audit", ["username", "at", "id"])
    op.drop_index("ix_audit_username", table_name="audit")


def downgrade() -> None:
    op.create_index("ix_audit_username", "audit", ["username"])
    op.drop_index("ix_audit_user_time", table_name="audit")
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("latency_ms")
