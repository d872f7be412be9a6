"""Graph transport state, shared and app-only mailboxes, API token scopes

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 00:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shared", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("app_only", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("graph_folder_id", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("graph_delta_link", sa.Text(), nullable=True))
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("remote_id", sa.String(length=512), nullable=True))
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scope", sa.String(length=16), server_default="write", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("scope")
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_column("remote_id")
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("graph_delta_link")
        batch_op.drop_column("graph_folder_id")
        batch_op.drop_column("app_only")
        batch_op.drop_column("shared")
