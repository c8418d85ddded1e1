"""one word per concept: the users table's TOTP key columns are named for what they hold

``secret`` and ``pending_secret`` held encrypted TOTP keys; ``secret`` also meant the
password field, the NAS shared secret and any config secret. The data is unchanged.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.alter_column("secret", new_column_name="totp_key")
        batch.alter_column("pending_secret", new_column_name="pending_totp_key")


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.alter_column("totp_key", new_column_name="secret")
        batch.alter_column("pending_totp_key", new_column_name="pending_secret")
