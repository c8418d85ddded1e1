"""admin features: recovery codes, a bypass that ends by itself, a per-user clock offset

- ``recovery_codes``: one row per unused recovery code, only a keyed hash of it
  (HMAC-SHA-256 under a key derived from the key file, bound to the user);
  using a code deletes its row, in one conditional DELETE.
- ``users.bypass_until``: when a time-limited bypass ends (NULL: until turned off).
- ``users.step_offset``: the time steps a user's authenticator runs ahead (or,
  negative, behind), set by ``user resync``; codes are looked for around now
  plus that many steps.
- ``portal_sessions.recovery_display``: new recovery codes, encrypted, waiting to
  be shown once on the account page right after a set-up in the portal.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("bypass_until", sa.BigInteger))
        batch.add_column(sa.Column("step_offset", sa.Integer, nullable=False,
                                   server_default="0"))
    op.create_table(
        "recovery_codes",
        sa.Column("username", sa.String(256), primary_key=True),
        sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("portal_sessions") as batch:
        batch.add_column(sa.Column("recovery_display", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("portal_sessions") as batch:
        batch.drop_column("recovery_display")
    op.drop_table("recovery_codes")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("step_offset")
        batch.drop_column("bypass_until")
