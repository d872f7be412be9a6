"""alerts and token health

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 21:06:37.324994
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=True),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notify_error", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["channel_id"], ["channels.id"], name=op.f("fk_alerts_channel_id_channels"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_channel_id"), ["channel_id"], unique=False)
        batch_op.create_index("ix_alerts_key_resolved_at", ["key", "resolved_at"], unique=False)

    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("watchdog_hours", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("token_failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("token_failing_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("token_refresh_count", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("token_refresh_count")
        batch_op.drop_column("token_failing_since")
        batch_op.drop_column("token_failures")
        batch_op.drop_column("watchdog_hours")

    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_key_resolved_at")
        batch_op.drop_index(batch_op.f("ix_alerts_channel_id"))

    op.drop_table("alerts")
