"""initial schema: users, audit, repeat_cache

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("username", sa.String(256), primary_key=True),
        sa.Column("required", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("enrollment_deadline", sa.BigInteger),
        sa.Column("secret", sa.LargeBinary),
        sa.Column("key_version", sa.Integer),
        sa.Column("enrolled_at", sa.BigInteger),
        sa.Column("last_step", sa.BigInteger),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", sa.BigInteger),
        sa.Column("bypass", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.BigInteger, nullable=False, index=True),
        sa.Column("username", sa.String(256), nullable=False, index=True),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
    )
    op.create_table(
        "repeat_cache",
        sa.Column("key", sa.LargeBinary(32), primary_key=True),
        sa.Column("username", sa.String(256), nullable=False, index=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("repeat_cache")
    op.drop_table("audit")
    op.drop_table("users")
