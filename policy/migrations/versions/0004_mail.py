"""mail: the outbox, and which enrollment period was reminded

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("reminded_deadline", sa.BigInteger))
    # The reminder scan looks for deadlines within reminder_hours, every poll.
    op.create_index("ix_users_enrollment_deadline", "users", ["enrollment_deadline"])
    op.create_table(
        "mail_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("username", sa.String(256), nullable=False, index=True),
        sa.Column("deadline", sa.BigInteger),
        sa.Column("detail", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False, index=True),
        sa.Column("claimed_until", sa.BigInteger),
        sa.Column("claim_token", sa.String(32)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(512)),
        sa.Column("address", sa.String(320)),
        sa.Column("done_at", sa.BigInteger),
    )


def downgrade() -> None:
    op.drop_table("mail_outbox")
    op.drop_index("ix_users_enrollment_deadline", "users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("reminded_deadline")
