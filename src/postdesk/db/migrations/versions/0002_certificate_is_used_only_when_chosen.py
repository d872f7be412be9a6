"""certificate is used only when chosen

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 19:12:15.844710
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("microsoft_apps", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("use_certificate", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Until now a stored certificate was always used: keep it that way for existing installations.
    op.execute("UPDATE microsoft_apps SET use_certificate = (certificate_private_key IS NOT NULL)")


def downgrade() -> None:
    with op.batch_alter_table("microsoft_apps", schema=None) as batch_op:
        batch_op.drop_column("use_certificate")
