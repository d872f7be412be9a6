"""A private Dovecot 2.3 IMAP server standing in for Exchange Online's IMAP, for the tests and the demo.

It validates the sandbox identity platform's access tokens over XOAUTH2, so Postdesk signs in to it
exactly as it signs in to outlook.office365.com:993.

Verified on Debian 12's dovecot-imapd 2.3.19.1, run as root:

- `dovecot -F -c DIR/dovecot.conf` with a config that includes nothing from /etc/dovecot accepts TLS
  about 0.06 s after the start; SIGTERM stops the master and its children.
- Implicit TLS only (`inet_listener imaps` with `ssl = yes`, as outlook.office365.com:993), `ssl =
  required`, a trustme certificate for 127.0.0.1 and localhost.
- Token validation: `introspection_mode = post` against the sandbox's RFC 7662 `/_sandbox/introspect`
  (`force_introspection = yes`, `active_attribute = active`, `active_value = true`, `username_attribute
  = username`, `scope = IMAP.AccessAsUser.All`), trusting the sandbox CA through `tls_ca_cert_file` in
  oauth2.conf.ext. It works as documented on 2.3.19, so local JWT validation is not needed. Every login
  asks the sandbox (`auth_cache_size = 0`), so `directory.clock_offset` takes effect at once. A token
  for another user ("Username 'x' did not match 'y'"), a garbage or expired token ("Provided token is
  not valid") and a Graph token ("Token is not valid for scope") all end in `NO [AUTHENTICATIONFAILED]`.
- Shared mailboxes, as Exchange Online does them: a delegate's token opens the shared mailbox with
  XOAUTH2 `user=<shared address>` when the delegate has FullAccess on it. Dovecot 2.3.19 does not expand
  %variables in `introspection_url` (a `%` there makes the auth process panic on its first request), so
  the endpoint cannot be told the mailbox. Instead a second oauth2 passdb, tried when the first refuses,
  accepts a live token of the same domain and lets the login through only when `,<login user>,` is in
  the `mailboxes` the introspection lists (the user's own and those with FullAccess): `pass_attrs` sets
  `allow_nets` to everything or to nothing with `%{if;…;*;…}`. A refusal there logs "allow_nets check
  failed" after the first passdb's "Username … did not match …".
- App-only access, as Exchange Online does it for an app with IMAP.AccessAsApp: the app's client
  credentials token (no user in it) opens a mailbox with XOAUTH2 `user=<mailbox>` when the app has
  FullAccess on it. A third oauth2 passdb requires the scope IMAP.AccessAsApp and, as the second, lets
  the login through only when `,<login user>,` is in the listed `mailboxes` (for an app token, those it
  has FullAccess on). Every passdb reads the RFC 7662 `username` (the user's UPN; an app token's client
  id, which matches no login) rather than `upn`: an answer without the username attribute is an internal
  failure in Dovecot, and one internal failure makes any later refusal "[UNAVAILABLE] Temporary
  authentication failure" instead of AUTHENTICATIONFAILED. A scope mismatch ends the passdb chain at
  once, so the name check is what keeps user tokens and app tokens in their own passdbs.
- The namespace separator is "/" as on Exchange Online; on disk it is Maildir++ (`.Parent.Child`, names
  in modified UTF-7). The Outlook special-use folders (Archive, Deleted Items, Drafts, Junk Email, Sent
  Items) are created and subscribed at a mailbox's first login.

Gotchas:
- The auth process runs as `dovecot`, login processes as `dovenull`, mail processes as `vmail`: all must
  reach DIR. pytest's temp dirs sit below a 0700 directory, so when `state_dir` is not reachable by
  other users (or too long for unix socket paths) the server works in a directory of its own from
  `tempfile.mkdtemp` (mode 0755), copies `dovecot.log` into `state_dir` on exit and removes it. The
  sandbox CA is copied into DIR for the same reason.
- `auth_failure_delay` (default 2 s) is set to 0; a refusal still takes about 0.5 s. Separately, Dovecot
  delays every later login from an address that failed, valid ones too (2 s doubling to 15 s), and no
  setting turns that off. Tests that expect a refusal log in from `spare_source_address()` (127.0.0.2,
  127.0.0.3, ...; each handed out once), which `imap_login(source_address=...)` binds before connecting.
- XOAUTH2 failures arrive as a `+ <base64 JSON>` challenge that the client must answer with an empty line
  before the tagged NO; `imap_login` does that.
- Never read files under base_dir (DIR/run): it holds FIFOs and a read blocks forever. The log
  (DIR/dovecot.log) is written asynchronously by the log process: use `wait_for_log`.
- Test mail goes straight into the maildir, the way an MTA does it: write into `tmp/`, fchown to vmail,
  rename into `new/` or, with flags, into `cur/` as `<name>:2,<flags>`. One create and one rename per
  message: 10,000 messages in 0.9 s on a quiet machine (about 1,200/s when /tmp is busy);
  `dovecot-lda` forks a process per message and is far slower.
- `reset_uidvalidity` deletes the folder's `dovecot-uidlist` and index files; the next session assigns
  UIDs 1..n under a new UIDVALIDITY, which Dovecot keeps increasing through the `dovecot-uidvalidity`
  file, so it differs even within the same second.
"""

from __future__ import annotations

import base64
import imaplib
import itertools
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType

import trustme

from postdesk.sandbox import RegisteredApp, SandboxDirectory
from postdesk.sandbox.identity import AuthenticatedClient, TokenRequest, parse_scopes, user_token_response

MAIL_USER = "vmail"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
# A passdb's `allow_nets`: every address when `,<login user>,` is in the introspection's `mailboxes`,
# else none (see the module docstring).
_ALLOW_LISTED_MAILBOXES = "allow_nets=%{if;%{oauth2:mailboxes};*;*,%Lu,*;0.0.0.0/0,::/0;255.255.255.255/32}"
# `issue_token(upn, scope=IMAP_SCOPE) -> access token`, as the tests' fixture of that name provides it.
IssueToken = Callable[..., str]
STARTUP_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
MAILDIR_FLAGS = frozenset("DFPRST")
# The special-use folders every Exchange Online mailbox has, under their English names.
OUTLOOK_FOLDERS = {
    "Archive": "\\Archive",
    "Deleted Items": "\\Trash",
    "Drafts": "\\Drafts",
    "Junk Email": "\\Junk",
    "Sent Items": "\\Sent",
}


def mail_user_ids() -> tuple[int, int]:
    """The uid and gid every mailbox belongs to; creates the system user `vmail` when missing."""
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", MAIL_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(part).st_mode & 0o001 for part in [path, *path.parents])


def access_token_for(
    directory: SandboxDirectory, app: RegisteredApp, upn: str, *, scope: str = IMAP_SCOPE
) -> str:
    """An access token for `upn` as the sandbox's token endpoint would issue it after a sign-in with
    consent to `scope` (the same code path, without the browser pages)."""
    user = directory.find_user(upn)
    if user is None:
        raise KeyError(f"no sandbox user {upn}")
    scopes = parse_scopes(scope)
    directory.grant_consent(user.oid, app.client_id, scopes.consent_names())
    authority = directory.resolve_authority(user.tenant_id)
    if authority is None:
        raise KeyError(f"no sandbox tenant {user.tenant_id}")
    request = TokenRequest(
        directory=directory,
        authority=authority,
        base_url="https://login.sandbox.invalid",
        fields={},
        authorization_header=None,
        client_ip="127.0.0.1",
    )
    response = user_token_response(
        request,
        AuthenticatedClient(app, appidacr="1"),
        user,
        scopes,
        nonce=None,
        session_id=directory.open_session(user.oid),
        rotate=False,
    )
    token: str = response["access_token"]
    return token


def xoauth2_payload(user: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response, before base64 (imaplib encodes it)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


class _BoundIMAP4SSL(imaplib.IMAP4_SSL):
    """IMAP4_SSL whose socket connects from a chosen local address (imaplib has no option for it)."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext, source_address: str) -> None:
        self._source_address = source_address
        self._tls_context = ssl_context
        super().__init__(host, port, ssl_context=ssl_context, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout, (self._source_address, 0))
        return self._tls_context.wrap_socket(raw, server_hostname=self.host)


def imap_login(
    host: str, port: int, ca_path: Path, token: str, mailbox: str, *, source_address: str = "127.0.0.1"
) -> imaplib.IMAP4_SSL:
    """Connect over implicit TLS from `source_address` and AUTHENTICATE XOAUTH2 as `mailbox`.

    Raises `imaplib.IMAP4.error` (its text holds e.g. `[AUTHENTICATIONFAILED]`) when Dovecot refuses.
    """
    context = ssl.create_default_context(cafile=str(ca_path))
    client = _BoundIMAP4SSL(host, port, ssl_context=context, source_address=source_address)
    answers = iter([xoauth2_payload(mailbox, token)])

    def respond(challenge: bytes) -> bytes:
        # The first (empty) challenge gets the credentials; an error challenge gets an empty line.
        return next(answers, b"")

    try:
        client.authenticate("XOAUTH2", respond)
    except BaseException:
        client.shutdown()
        raise
    return client


def modified_utf7(name: str) -> str:
    """A folder name as IMAP (RFC 3501 modified UTF-7) and Dovecot's maildir names spell it."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + encoded.replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


class DovecotServer:
    """Dovecot serving IMAPS on `host:port` for any address, trusting the sandbox's access tokens.

    Use as a context manager. Mailboxes exist as soon as mail is delivered to them or they log in.
    """

    def __init__(self, state_dir: Path, *, sandbox_base_url: str, sandbox_ca: Path) -> None:
        self.state_dir = Path(state_dir)
        self.sandbox_base_url = sandbox_base_url.rstrip("/")
        self.sandbox_ca = Path(sandbox_ca)
        self.host = "127.0.0.1"
        self.port = 0
        self.directory = self.state_dir
        self._own_directory = False
        self._process: subprocess.Popen[bytes] | None = None
        self._uid, self._gid = -1, -1
        self._sequence = itertools.count()
        self._spare_addresses = (f"127.0.{high}.{low}" for high in range(256) for low in range(2, 255))

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The PEM file of the CA that signed the server certificate: IMAP clients must trust it."""
        return self.directory / "tls" / "ca.pem"

    @property
    def config_path(self) -> Path:
        return self.directory / "dovecot.conf"

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("Dovecot is already running")
        self._uid, self._gid = mail_user_ids()
        self._prepare_directory()
        self.port = free_port()
        self._write_tls_files()
        self._write_config()
        log = (self.directory / "dovecot.stdout").open("wb")
        with log:
            self._process = subprocess.Popen(
                ["/usr/sbin/dovecot", "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_serving()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_directory:
            self._own_directory = False
            for name in ("dovecot.log", "dovecot.stdout"):
                if (self.directory / name).exists():
                    shutil.copyfile(self.directory / name, self.state_dir / name)
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """Everything Dovecot has logged so far (a regular file, unlike what lives under base_dir)."""
        path = self.directory / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spare_source_address(self) -> str:
        """A loopback address no client of this server has used yet (127.0.0.2, 127.0.0.3, ...).

        Log in from one for each test that expects a refusal: Dovecot then delays every later login
        from that address, valid ones included, by 2 s doubling up to 15 s.
        """
        return next(self._spare_addresses)

    def wait_for_log(self, text: str, *, timeout: float = 2.0) -> bool:
        """Whether `text` shows up in the log within `timeout` seconds (the log process writes
        asynchronously, so a line can land just after the client saw the reply)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # -- mail ----------------------------------------------------------------------------------

    def imap_login(self, token: str, mailbox: str, *, source_address: str = "127.0.0.1") -> imaplib.IMAP4_SSL:
        """Log in to `mailbox` with SASL XOAUTH2; see the module function `imap_login`."""
        return imap_login(self.host, self.port, self.ca_path, token, mailbox, source_address=source_address)

    def deliver(
        self,
        mailbox: str,
        raw: bytes,
        *,
        flags: str = "",
        folder: str = "INBOX",
        received: datetime | None = None,
    ) -> None:
        """Put one message into a folder (INBOX unless told); `flags` are maildir letters ("S" is \\Seen)."""
        self.deliver_many(mailbox, [raw], flags=flags, folder=folder, received=received)

    def deliver_many(
        self,
        mailbox: str,
        raws: Iterable[bytes],
        *,
        flags: str = "",
        folder: str = "INBOX",
        received: datetime | None = None,
    ) -> int:
        """Put messages into a folder the way an MTA writes a maildir; returns how many were written.

        ``received`` backdates the arrival (IMAP INTERNALDATE, which Dovecot takes from the file's mtime),
        e.g. for mail that was in the mailbox long before Postdesk connected it."""
        target = self._folder_path(mailbox, folder)
        self._ensure_maildir(target)
        info = self._maildir_info(flags)
        destination = target / ("cur" if info else "new")
        hostname = socket.gethostname().replace("/", "_").replace(":", "_")
        written = 0
        for raw in raws:
            name = f"{int(time.time())}.M{next(self._sequence)}P{os.getpid()}.{hostname},S={len(raw)}"
            staged = target / "tmp" / name
            with staged.open("wb") as file:
                file.write(raw)
                os.fchown(file.fileno(), self._uid, self._gid)
            if received is not None:
                os.utime(staged, (received.timestamp(), received.timestamp()))
            staged.rename(destination / (name + info))
            written += 1
        return written

    def message_count(self, mailbox: str, folder: str = "INBOX") -> int:
        """How many messages the folder holds on disk (new and cur, expunged ones excluded)."""
        target = self._folder_path(mailbox, folder)
        return sum(1 for sub in ("new", "cur") if (target / sub).is_dir() for _ in (target / sub).iterdir())

    def messages(self, mailbox: str, folder: str = "INBOX") -> list[bytes]:
        """The raw messages the folder holds on disk, oldest arrival first (empty if it does not exist)."""
        target = self._folder_path(mailbox, folder)
        subfolders = [target / sub for sub in ("new", "cur") if (target / sub).is_dir()]
        files = [path for subfolder in subfolders for path in subfolder.iterdir()]
        files.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [path.read_bytes() for path in files]

    def create_folder(self, mailbox: str, name: str) -> None:
        """Create a folder (and its parents); hierarchy uses "/" as in Exchange Online."""
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            path = self._folder_path(mailbox, "/".join(parts[:depth]))
            self._ensure_maildir(path)
            marker = path / "maildirfolder"
            marker.touch()
            os.chown(marker, self._uid, self._gid)

    def reset_uidvalidity(self, mailbox: str, folder: str = "INBOX") -> None:
        """Make Dovecot forget the folder's UIDs, so the next session sees a new UIDVALIDITY and
        renumbered messages (what a mailbox restore or migration does to a real server)."""
        target = self._folder_path(mailbox, folder)
        for path in target.glob("dovecot-uidlist*"):
            path.unlink()
        for path in target.glob("dovecot.index*"):
            path.unlink()

    def mailbox_path(self, mailbox: str) -> Path:
        """The user's Maildir: DIR/mail/<domain>/<local part>/Maildir (mail_location's %d/%n)."""
        local, _, domain = mailbox.lower().partition("@")
        if not local or not domain or "/" in mailbox or mailbox.startswith("."):
            raise ValueError(f"not a mailbox address: {mailbox!r}")
        return self.directory / "mail" / domain / local / "Maildir"

    # -- internals -----------------------------------------------------------------------------

    def _folder_path(self, mailbox: str, folder: str) -> Path:
        root = self.mailbox_path(mailbox)
        if folder.upper() == "INBOX":
            return root
        if any(not part or part.startswith(".") or "." in part for part in folder.split("/")):
            raise ValueError(f"folder names here may not contain '.' or empty parts: {folder!r}")
        return root / ("." + ".".join(modified_utf7(part) for part in folder.split("/")))

    def _ensure_maildir(self, path: Path) -> None:
        mail_root = self.directory / "mail"
        missing = [path, *itertools.takewhile(lambda parent: parent != mail_root, path.parents)]
        for directory in reversed(missing):
            self._make_owned_dir(directory)
        for sub in ("cur", "new", "tmp"):
            self._make_owned_dir(path / sub)

    def _make_owned_dir(self, path: Path) -> None:
        if not path.is_dir():
            path.mkdir(mode=0o700)
            os.chown(path, self._uid, self._gid)

    @staticmethod
    def _maildir_info(flags: str) -> str:
        letters = set(flags.upper())
        if not letters <= MAILDIR_FLAGS:
            raise ValueError(f"maildir flags are letters from {''.join(sorted(MAILDIR_FLAGS))}: {flags!r}")
        return ":2," + "".join(sorted(letters)) if letters else ""

    def _prepare_directory(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths under base_dir must stay below 108 bytes.
        if _reachable_by_others(self.state_dir) and len(str(self.state_dir)) <= 50:
            self.directory = self.state_dir
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="postdesk-dovecot-"))
            self._own_directory = True
        self.directory.chmod(0o755)
        for name in ("run", "state", "tls"):
            (self.directory / name).mkdir(mode=0o755, exist_ok=True)
        mail = self.directory / "mail"
        mail.mkdir(mode=0o755, exist_ok=True)
        os.chown(mail, self._uid, self._gid)

    def _write_tls_files(self) -> None:
        authority = trustme.CA()
        certificate = authority.issue_cert("127.0.0.1", "localhost")
        tls = self.directory / "tls"
        authority.cert_pem.write_to_path(str(tls / "ca.pem"))
        (tls / "server.pem").write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
        key = tls / "server.key"
        key.touch(mode=0o600)
        certificate.private_key_pem.write_to_path(str(key))
        shutil.copyfile(self.sandbox_ca, tls / "sandbox-ca.pem")
        (tls / "sandbox-ca.pem").chmod(0o644)

    def _write_config(self) -> None:
        (self.directory / "oauth2.conf.ext").write_text(self._oauth2_config())
        (self.directory / "oauth2-delegates.conf.ext").write_text(self._delegate_config())
        (self.directory / "oauth2-apps.conf.ext").write_text(self._app_config())
        self.config_path.write_text(self._dovecot_config())

    def _oauth2_config(self, *, scope: str = "IMAP.AccessAsUser.All") -> str:
        return "\n".join(
            [
                "# The sandbox identity platform's RFC 7662 endpoint decides whether a token is live.",
                "introspection_mode = post",
                f"introspection_url = {self.sandbox_base_url}/_sandbox/introspect",
                "force_introspection = yes",
                "active_attribute = active",
                "active_value = true",
                "username_attribute = username",
                f"scope = {scope}",
                f"tls_ca_cert_file = {self.directory / 'tls' / 'sandbox-ca.pem'}",
                "timeout_msecs = 5000",
                "",
            ]
        )

    def _delegate_config(self) -> str:
        """The second passdb: a delegate's token for a mailbox the introspection says it may open."""
        return self._oauth2_config() + "\n".join(
            [
                "# Any live token of the domain passes the name check; the mailbox list decides.",
                "username_format = %Ld",
                f"pass_attrs = {_ALLOW_LISTED_MAILBOXES}",
                "",
            ]
        )

    def _app_config(self) -> str:
        """The third passdb: an app's token (IMAP.AccessAsApp) for a mailbox it has FullAccess on."""
        return self._oauth2_config(scope="IMAP.AccessAsApp") + "\n".join(
            [
                "# An app token names no user: the same constant on both sides of the name check, so the",
                "# scope and the mailbox list decide.",
                "username_format = app",
                f"pass_attrs = {_ALLOW_LISTED_MAILBOXES}",
                "",
            ]
        )

    def _dovecot_config(self) -> str:
        root = self.directory
        mailboxes = "\n".join(
            f'  mailbox "{name}" {{\n    auto = subscribe\n    special_use = {use}\n  }}'
            for name, use in OUTLOOK_FOLDERS.items()
        )
        return f"""# Written by tests/support/dovecot.py; self-contained, includes nothing from /etc/dovecot.
base_dir = {root}/run
state_dir = {root}/state
instance_name = postdesk-test-{self.port}
log_path = {root}/dovecot.log
protocols = imap
listen = {self.host}
shutdown_clients = yes

ssl = required
ssl_cert = <{root}/tls/server.pem
ssl_key = <{root}/tls/server.key
ssl_min_protocol = TLSv1.2

auth_mechanisms = xoauth2 oauthbearer
auth_verbose = yes
auth_cache_size = 0
# Refusals come back at once (default 2 s); the per-address penalty below still applies.
auth_failure_delay = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
# Tried when the first refuses: a delegate opening a shared mailbox (see the module docstring).
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2-delegates.conf.ext
}}
# Tried last: an app opening a mailbox with its own token (IMAP.AccessAsApp).
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2-apps.conf.ext
}}
userdb {{
  driver = static
  args = uid={self._uid} gid={self._gid} home={root}/mail/%d/%n allow_all_users=yes
}}

mail_uid = {self._uid}
mail_gid = {self._gid}
first_valid_uid = {min(self._uid, 100)}
first_valid_gid = {min(self._gid, 100)}
mail_location = maildir:{root}/mail/%d/%n/Maildir
mail_fsync = never
# IDLE hears of new mail through inotify, but the kernel gives one user 128 inotify instances
# (fs.inotify.max_user_instances) and every mail process runs as the same user: past 128 IDLE sessions
# Dovecot looks at the folder on this interval instead (30 s by default).
mailbox_idle_check_interval = 1 secs

namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}
}}

# Room for a worker that keeps hundreds of mailboxes in IDLE at once. By default every TLS connection
# holds an imap-login process of its own (100 at most); here a few login processes serve them all.
default_client_limit = 4000
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {self.port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 2000
}}
service imap {{
  process_limit = 2000
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
"""

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        context = ssl.create_default_context(cafile=str(self.ca_path))
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                output = (self.directory / "dovecot.stdout").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"Dovecot exited during start-up:\n{output}\n{self.log_text()}")
            try:
                with (
                    socket.create_connection((self.host, self.port), timeout=1) as raw,
                    context.wrap_socket(raw, server_hostname=self.host),
                ):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"Dovecot did not accept TLS on port {self.port} within {STARTUP_TIMEOUT_SECONDS}s"
        )
