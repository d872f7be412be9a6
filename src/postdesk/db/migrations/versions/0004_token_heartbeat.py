"""token heartbeat

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 20:11:44.740651
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_refreshed_at", sa.DateTime(timezone=True), nullable=True))
    # Connected mailboxes last redeemed their sign-in when they were connected, as far as we know.
    op.execute("UPDATE channels SET token_refreshed_at = connected_at WHERE token_cache IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("token_refreshed_at")
