"""the self-service portal: a pending key per user, portal sessions

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("pending_secret", sa.LargeBinary))
        batch.add_column(sa.Column("pending_key_version", sa.Integer))
        batch.add_column(sa.Column("pending_created_at", sa.BigInteger))
        batch.add_column(sa.Column("pending_expires_at", sa.BigInteger))
    op.create_table(
        "portal_sessions",
        sa.Column("id_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("username", sa.String(256), nullable=False, index=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("identity", sa.String(4096), nullable=False),
        sa.Column("mfa_verified", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("portal_sessions")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("pending_expires_at")
        batch.drop_column("pending_created_at")
        batch.drop_column("pending_key_version")
        batch.drop_column("pending_secret")
