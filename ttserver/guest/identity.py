"""A VM's own identity: hostname and authorized keys for every VM, and for a warm clone
everything it shares with its template (machine-id, SSH host key, clock, kernel RNG).

Why a resident helper: under TCG every binary a guest runs for the first time after a
restore is translated afresh (the translation cache is not part of the saved state):
~0.3–0.8 s per first exec, measured. Giving a clone its identity with a shell script cost
2.1 s (sh, perl, date). So the template starts one small perl process before it is saved;
every clone inherits it, already loaded and waiting on a virtio-serial port of its own
(CHANNEL; libvirt's `<channel>`, whose host end is a UNIX socket of QEMU's). The server
connects to that socket as soon as the clone runs and writes the clone's identity into
it; the helper applies it and answers on the same port. No agent call and no exec: the
step is the re-translation of one short perl loop (shell script 2.1 s; helper fed and
polled through the agent 0.5–0.8 s after the agent answered; measured). The helper
exits after it answered: nothing of it stays in the user's VM. A port, not a file QEMU
reads when it starts (a fw_cfg file until layout 5 of warm/snapshots.py): the request is
written after the QEMU process exists, so a clone's QEMU can be started before anyone
knows which VM it will become (docs/decisions.md, 82), and its clock is set from the
time the request is written rather than from a guess at how long the restore takes.
sshd: OpenSSH 9.2 (bookworm) re-executes itself per connection and reads the new host
key then. From OpenSSH 9.8 (trixie has 10.0) the listener loads the host keys once and
hands them to each `sshd-session`, so it kept serving the template's key (clients that
pin the clone's key: "Host key verification failed"). Where `sshd-session` exists the
helper sends the listener SIGHUP (sshd(8): it re-executes itself and reloads its keys)
and waits until a new socket listens on port 22, before the clone is reported running.
The tests compare the key sshd serves with the file.

Templates whose guest could not start the helper (no perl, no port) give identity by the
shell script (`NEW_IDENTITY`) through the agent — slower, same result.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field

import libvirt

from ttclient.arches import by_name
from ttclient.waiting import WaitTimeout, wait_for

from ..vm import domainxml
from . import agent, sshexec

HELPER_DIR = "/run/ttstack"
READY = f"{HELPER_DIR}/identity.ready"  # the helper writes "ok", or why it cannot serve
# the virtio-serial port (libvirt channel target name) templates and clones carry; the
# guest's udev names it /dev/virtio-ports/NAME
CHANNEL = domainxml.IDENTITY_CHANNEL
PORT_PATH = f"/dev/virtio-ports/{CHANNEL}"
# the request's most bytes: the helper reads it into memory (ENV keys are capped below it,
# admission.MAX_SSH_KEYS_BYTES)
MAX_REQUEST = 64 << 10
# the request's header, 24 bytes: MAGIC, the nonce (16 hex digits), the payload's length
# (4 bytes, big-endian)
MAGIC = b"TTID"
# settimeofday(2) has no perl built-in; its number differs between syscall tables
# (ttclient.arches.ArchProfile.settimeofday).

# The helper opens the port and reads it: while no host end is connected a read returns
# 0 at once (Linux virtio_console: "nothing's connected on the host"), so it tries again
# every 10 ms; once the server connected, a read blocks until the request is there. The
# payload is eight length-prefixed fields (perl's `(N/a*)8`): seconds, microseconds,
# hostname, authorized_keys, machine-id, RNG seed, SSH host key, its public line. The
# answer, "ttstack-identity NONCE ok" or "... NONCE error: why", goes back on the port.
HELPER = r"""
use strict; use warnings; umask 077;
my ($dir, $port, $settime, $ready) = @ARGV;
mkdir $dir, 0700;
sub put { my ($path, $data, $mode) = @_;
  open(my $f, ">", "$path.tt") or die "$path: $!"; print $f $data; close $f or die "$path: $!";
  chmod $mode, "$path.tt"; rename "$path.tt", $path or die "$path: $!"; }
sub listener {  # the inode of the socket listening on port 22, if any
  for my $t ("/proc/net/tcp", "/proc/net/tcp6") { open(my $f, "<", $t) or next;
    while (<$f>) { my @c = split; return $c[9] if @c > 9 && $c[3] eq "0A"
      && $c[1] =~ /:0016$/ } }
  return "" }
sub reload_sshd {  # OpenSSH >= 9.8 holds host keys in its listener: HUP, await new socket
  -e "/usr/lib/openssh/sshd-session" or return;
  open(my $p, "<", "/run/sshd.pid") or return; my $pid = <$p>; close $p;
  defined $pid && $pid =~ /^(\d+)/ or return; $pid = $1;
  my $old = listener(); kill("HUP", $pid) or return;
  for (1 .. 400) { my $now = listener(); return if $now ne "" && $now ne $old;
    select(undef, undef, undef, 0.025) }
  die "sshd did not listen again within 10 s of SIGHUP" }
# O_RDWR (2 on every arch of ttclient.arches): not Fcntl, which loads a module
my $io;
if (!sysopen($io, $port, 2)) { put($ready, "cannot open $port: $!", 0600); exit 1 }
put($ready, "ok", 0600);
my ($d, $need) = ("", 24);
while (length($d) < $need) {
  my $n = sysread($io, $d, $need - length($d), length($d));
  if (!$n) { select(undef, undef, undef, 0.01); next }  # 0: no host end connected
  next if length($d) < 24;
  if (substr($d, 0, 4) ne "TTID") { $d = ""; next }
  $need = 24 + unpack("N", substr($d, 20, 4)) }
my $nonce = substr($d, 4, 16);
my $ok = eval {
  my ($s, $us, $host, $keys, $mid, $seed, $key, $pub) = unpack("(N/a*)8", substr($d, 24));
  syscall($settime, pack("l!l!", $s, $us), 0) == 0 or die "settimeofday: $!";
  open(my $r, ">", "/dev/urandom") or die "urandom: $!";
  syswrite($r, $seed); ioctl($r, 0x5207, 0) or die "reseed: $!"; close $r;
  open(my $hn, ">", "/proc/sys/kernel/hostname") or die "hostname: $!";
  print $hn $host; close $hn;
  put("/etc/hostname", "$host\n", 0644);
  open(my $hosts, "<", "/etc/hosts") or die "hosts: $!"; my @l = <$hosts>; close $hosts;
  for (@l) { $_ = "127.0.1.1 $host\n" if index($_, "127.0.1.1\t") == 0
    || index($_, "127.0.1.1 ") == 0 }
  put("/etc/hosts", join("", @l), 0644);
  put("/etc/machine-id", "$mid\n", 0444);
  my $k = "/etc/ssh/ssh_host_ed25519_key";
  opendir(my $d2, "/etc/ssh") or die "/etc/ssh: $!";  # no glob(): it loads a module
  unlink map { "/etc/ssh/$_" } grep { index($_, "ssh_host_") == 0
    && $_ ne "ssh_host_ed25519_key" && $_ ne "ssh_host_ed25519_key.pub" } readdir $d2;
  put($k, $key, 0600); put("$k.pub", $pub, 0644);
  mkdir "/root/.ssh", 0700; put("/root/.ssh/authorized_keys", $keys, 0600);
  reload_sshd();
  1 };
my $why = $@ || "unknown"; $why =~ s/\s+/ /g;
syswrite($io, $ok ? "ttstack-identity $nonce ok\n" : "ttstack-identity $nonce error: $why\n");
close $io;  # one identity per clone: nothing of the helper stays running
"""

# Templates record which helper they saved: one with another helper is rebuilt.
HELPER_ID = hashlib.sha256(HELPER.encode()).hexdigest()[:12]

# Shell set-up run by the guest's /bin/sh with: $1 hostname, $2 authorized_keys (cold
# boots, and warm clones whose template has no helper).
PERSONALIZE = r"""
echo "$1" > /proc/sys/kernel/hostname; echo "$1" > /etc/hostname
o=""; while IFS= read -r l || [ -n "$l" ]; do
  case "$l" in 127.0.1.1[[:space:]]*) l="127.0.1.1 $1";; esac; o="$o$l
"; done < /etc/hosts; printf %s "$o" > /etc/hosts
umask 077; [ -d /root/.ssh ] || mkdir /root/.ssh; printf %s "$2" > /root/.ssh/authorized_keys
"""
# A disk grown by --disk-size: an ext4 root on the whole disk (how `ttserver image build`
# makes them) grows online; a partitioned cloud image's is grown by cloud-init
# (growpart, resizefs), so it is left alone.
GROW_ROOT = r"""
PATH=/usr/sbin:/sbin:$PATH
d=$(findmnt -no SOURCE /)  # a kernel that mounted root itself says /dev/root
[ "$d" != /dev/root ] || d=/dev/$(basename "$(readlink -f "/sys/dev/block/$(mountpoint -d /)")")
case "$d" in
  /dev/vd[a-z]|/dev/sd[a-z]) out=$(resize2fs "$d" 2>&1) || { echo "$out" >&2; exit 1; };;
esac
"""
# The fallback for warm clones, with $3 time, $4 SSH host key, $5 its public line,
# $6 machine-id, $7 seed. Without a reseed every clone draws the same "random" numbers
# (measured: identical UUIDs); the ioctl RNDRESEEDCRNG (0x5207) forces one.
NEW_IDENTITY = r"""
perl -e 'open(my $f, ">", "/dev/urandom") or die; syswrite($f, pack("H*", $ARGV[0]));
 ioctl($f, 0x5207, 0) or die "reseed: $!"' "$7" ||
python3 -c 'import fcntl,os,sys; f=os.open("/dev/urandom",os.O_WRONLY);
os.write(f,bytes.fromhex(sys.argv[1])); fcntl.ioctl(f,0x5207)' "$7" || exit 3
date -u -s "@$3" >/dev/null; echo "$6" > /etc/machine-id
k=/etc/ssh/ssh_host_ed25519_key
for f in /etc/ssh/ssh_host_*; do
  case "$f" in "$k"|"$k.pub") ;; *) rm -f /etc/ssh/ssh_host_*; break;; esac
done
(umask 077; printf '%s\n' "$4" > "$k"); printf '%s\n' "$5" > "$k.pub"
if [ -e /usr/lib/openssh/sshd-session ] && [ -s /run/sshd.pid ]; then
  lsn() { awk '$4 == "0A" && $2 ~ /:0016$/ { print $10; exit }' /proc/net/tcp /proc/net/tcp6; }
  old=$(lsn); kill -HUP "$(cat /run/sshd.pid)"
  for i in $(seq 200); do
    now=$(lsn); [ -n "$now" ] && [ "$now" != "$old" ] && break; sleep 0.05
  done
fi
"""


class IdentityError(RuntimeError):
    """A warm clone could not be given its own identity; the message has the guest's error."""
    pass


def start_helper(dom: libvirt.virDomain, arch: str) -> bool:
    """In a template about to be saved: start the helper and wait until it opened its
    port (CHANNEL). False when this guest cannot have one (no perl, no port, an arch
    without a settimeofday number): clones then take their identity by script."""
    profile = by_name(arch)
    if not profile.settimeofday:
        return False
    agent.command(dom, "guest-exec", {
        "path": "/usr/bin/perl",
        "arg": ["-e", HELPER, HELPER_DIR, PORT_PATH, str(profile.settimeofday), READY]})

    def ready() -> bytes | None:
        try:
            return agent.read_file(dom, READY)
        except agent.AgentError:
            return None

    try:
        return wait_for(ready, 30, interval=0.2, what="the identity helper") == b"ok"
    except WaitTimeout:
        return False


def personalize(dom: libvirt.virDomain, hostname: str, keys: str, grow: bool = False) -> None:
    """A cold-booted VM: hostname and authorized keys; with `grow`, its root filesystem
    grown to its (grown) disk. IdentityError when a step fails."""
    _script(dom, "set -e" + PERSONALIZE + (GROW_ROOT if grow else ""), [hostname, keys],
            120.0 if grow else 30.0)


@dataclass(frozen=True)
class NewIdentity:
    """What makes a warm clone its own machine: hostname, authorized keys (text),
    machine-id, RNG seed (64 bytes), SSH host key (private key file bytes, public line),
    and the nonce its helper answers with."""

    hostname: str
    keys: str
    machine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(64))
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    host_key: tuple[bytes, str] = (b"", "")

    @classmethod
    def make(cls, hostname: str, keys: str) -> NewIdentity:
        """A fresh identity (its host key made here: ssh-keygen takes ms natively, about
        a second in a TCG guest)."""
        return cls(hostname, keys, host_key=sshexec.host_key_pair(hostname))

    def request(self, clock: float) -> bytes:
        """The helper's request (see HELPER), the guest clock to be set to `clock` (Unix
        seconds); IdentityError when it exceeds MAX_REQUEST bytes."""
        private, public = self.host_key
        fields = [str(int(clock)).encode(), str(int(clock % 1 * 1e6)).encode(),
                  self.hostname.encode(), self.keys.encode(), self.machine_id.encode(),
                  self.seed, private, (public + "\n").encode()]
        payload = b"".join(struct.pack(">I", len(f)) + f for f in fields)
        blob = MAGIC + self.nonce.encode() + struct.pack(">I", len(payload)) + payload
        if len(blob) > MAX_REQUEST:
            raise IdentityError(f"the identity ({len(blob)} bytes, authorized keys "
                                f"included) exceeds the helper's {MAX_REQUEST} bytes")
        return blob


class Channel:
    """The host's end of a warm clone's identity port: a connection to the UNIX socket
    libvirt made for the domain's CHANNEL (its path from the live domain XML). Send the
    request with `offer`, wait for the helper's answer with `answer`, then `close`.
    OSError when the socket cannot be reached."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.sock.close()

    def offer(self, new: NewIdentity) -> None:
        """Send the helper `new`, the guest clock set to now (the helper applies it within
        milliseconds of reading it)."""
        self.sock.sendall(new.request(time.time()))

    def answer(self, nonce: str, timeout: float) -> None:
        """Wait up to `timeout` s for the helper's answer to the request with `nonce`;
        IdentityError with the guest's reason, or when none comes."""
        mark = f"ttstack-identity {nonce} ".encode()
        deadline = time.monotonic() + timeout
        text = b""
        while mark not in text or b"\n" not in text[text.index(mark):]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise IdentityError(f"guest set-up: no answer from the helper in "
                                    f"{timeout:.0f}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise IdentityError("guest set-up: the identity port closed without an "
                                    "answer")
            text += chunk
        answer = text[text.index(mark) + len(mark):].split(b"\n", 1)[0]
        answer_text = answer.decode(errors="replace").strip()
        if answer_text != "ok":
            raise IdentityError(f"guest set-up failed: {answer_text.removeprefix('error: ')}")


def take_new(dom: libvirt.virDomain, new: NewIdentity, channel: Channel | None, *,
             timeout: float) -> None:
    """A warm clone: its own hostname, keys, machine-id, SSH host key, clock and RNG.
    With its template's helper (`channel`, on which `new` was offered): wait for the
    helper's answer; otherwise (None) run the script through the agent. IdentityError
    with the guest's reason, or on `timeout` seconds of silence."""
    if channel is not None:
        channel.answer(new.nonce, timeout)
        return
    private, public = new.host_key
    _script(dom, "set -e" + NEW_IDENTITY + PERSONALIZE,
            [new.hostname, new.keys, f"{time.time():.3f}", private.decode().strip(), public,
             new.machine_id, new.seed.hex()], timeout)


def _script(dom: libvirt.virDomain, script: str, args: list[str], timeout: float) -> None:
    res = agent.exec_argv(dom, ["/bin/sh", "-c", script, "sh", *args], timeout=timeout)
    if res.exit_code != 0:
        raise IdentityError(f"guest set-up failed ({res.exit_code}): {res.stderr.strip()}")


# systemd-networkd renews on request; then wait until the lease's default route is in
RENEW_LEASE = """set -e
for link in /sys/class/net/*; do
    name=${link##*/}
    [ "$name" = lo ] || networkctl renew "$name"
done
for i in $(seq 100); do
    ip -4 route show default | grep -q . && exit 0
    sleep 0.1
done
echo "no default route after renewing the DHCP lease" >&2
exit 1
"""


def renew_lease(dom: libvirt.virDomain, timeout: float) -> None:
    """A warm clone's network: renew its DHCP lease (QEMU user networking announces a
    router only when not restricted, and the template was made restricted) and wait for
    its default route; IdentityError when none comes."""
    _script(dom, RENEW_LEASE, [], timeout)


# bridge mode: the clone's NIC still answers to the template's MAC (the guest driver read
# it when the template booted; the saved device state carries it too). Each link goes
# down, takes the lease's MAC and comes up: systemd-networkd drops the template's lease
# with the carrier and asks again (`networkctl renew` needs D-Bus, which the images
# lack); where networkd does not run (ifupdown on cloud images), dhclient is asked. The
# bridge's DHCP server knows the VM by that MAC; network.wait_ready then waits for the
# address. (Not tested on an ifupdown image on a bridge.)
TAKE_MAC = """set -e
for link in /sys/class/net/*; do
    name=${link##*/}
    [ "$name" = lo ] && continue
    ip link set dev "$name" down
    ip link set dev "$name" address "$1"
    ip link set dev "$name" up
    if ! systemctl -q is-active systemd-networkd 2>/dev/null && command -v dhclient >/dev/null
    then
        ip -4 addr flush dev "$name"
        dhclient -nw "$name"
    fi
done
"""


def take_mac(dom: libvirt.virDomain, mac: str, timeout: float) -> None:
    """A warm clone on a bridge: its own MAC (`mac`, aa:bb:...) and a new DHCP lease
    asked for; IdentityError."""
    _script(dom, TAKE_MAC, [mac], timeout)
