"""inbound mail over IMAP

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 19:15:45.811226
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(length=255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "stored",
                "processed",
                "duplicate",
                "quarantined",
                name="inbound_status",
                native_enum=False,
                length=24,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(length=998), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("server_done", sa.Boolean(), nullable=False),
        sa.Column("article_id", sa.Integer(), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["article_id"],
            ["articles.id"],
            name=op.f("fk_inbound_messages_article_id_articles"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["channels.id"],
            name=op.f("fk_inbound_messages_channel_id_channels"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
        sa.UniqueConstraint(
            "channel_id", "folder", "uidvalidity", "uid", name=op.f("uq_inbound_messages_channel_id")
        ),
    )
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_index("ix_inbound_messages_channel_id_status", ["channel_id", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_inbound_messages_message_id"), ["message_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_inbound_messages_sha256"), ["sha256"], unique=False)

    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("auto_generated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("classification", sa.String(length=200), nullable=False, server_default="")
        )

    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("delete_after_fetch", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("max_message_bytes", sa.Integer(), nullable=False, server_default="26214400")
        )
        batch_op.add_column(
            sa.Column("fetch_interval_seconds", sa.Integer(), nullable=False, server_default="30")
        )
        batch_op.add_column(sa.Column("imap_uidvalidity", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("imap_baseline_uid", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("imap_last_uid", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column(
                "backlog_policy",
                sa.Enum(
                    "unread", "all", "since", "none", name="backlog_policy", native_enum=False, length=24
                ),
                nullable=False,
                server_default="unread",
            )
        )
        batch_op.add_column(sa.Column("backlog_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("backlog_count", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("backlog_confirmed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("backlog_done", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("last_fetch_summary", sa.String(length=200), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("last_mail_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("last_mail_at")
        batch_op.drop_column("last_fetch_summary")
        batch_op.drop_column("backlog_done")
        batch_op.drop_column("backlog_confirmed")
        batch_op.drop_column("backlog_count")
        batch_op.drop_column("backlog_since")
        batch_op.drop_column("backlog_policy")
        batch_op.drop_column("imap_last_uid")
        batch_op.drop_column("imap_baseline_uid")
        batch_op.drop_column("imap_uidvalidity")
        batch_op.drop_column("fetch_interval_seconds")
        batch_op.drop_column("max_message_bytes")
        batch_op.drop_column("delete_after_fetch")

    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.drop_column("classification")
        batch_op.drop_column("auto_generated")

    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inbound_messages_sha256"))
        batch_op.drop_index(batch_op.f("ix_inbound_messages_message_id"))
        batch_op.drop_index("ix_inbound_messages_channel_id_status")

    op.drop_table("inbound_messages")
