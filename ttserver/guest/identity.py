"""A VM's own identity: hostname and authorized keys for every VM, and for a warm clone
everything it shares with its template (machine-id, SSH host key, clock, kernel RNG).

Why a resident helper: under TCG every binary a guest runs for the first time after a
restore is translated afresh (the translation cache is not part of the saved state):
~0.3–0.8 s per first exec, measured. Giving a clone its identity with a shell script cost
2.1 s (sh, perl, date). So the template starts one small perl process before it is saved;
every clone inherits it, already loaded and waiting on a FIFO. The host writes one line
into that FIFO through the agent's file calls (no exec at all) and polls for the answer
file: the whole step is the re-translation of one short perl loop (2.1 s → 0.6 s,
measured). The helper exits after it answered: nothing of it stays in the user's VM.
sshd: OpenSSH 9.2 (bookworm) re-executes itself per connection and reads the new host
key then. From OpenSSH 9.8 (trixie has 10.0) the listener loads the host keys once and
hands them to each `sshd-session`, so it kept serving the template's key (clients that
pin the clone's key: "Host key verification failed"). Where `sshd-session` exists the
helper sends the listener SIGHUP (sshd(8): it re-executes itself and reloads its keys)
and waits until a new socket listens on port 22, before the clone is reported running.
The tests compare the key sshd serves with the file.

Templates built before the helper existed, or a helper that died, fall back to the shell
script (`NEW_IDENTITY`) — slower, same result.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

import libvirt

from ttclient.waiting import WaitTimeout, wait_for

from . import agent, sshexec

HELPER_DIR = "/run/ttstack"
FIFO = f"{HELPER_DIR}/identity.fifo"
ANSWER = f"{HELPER_DIR}/identity.done"
# settimeofday(2) has no perl built-in; its number differs between syscall tables.
SETTIMEOFDAY = {"x86_64": 164, "aarch64": 170, "riscv64": 170}
HELPER_POLL = 0.03

# One request per line: nonce, seconds, microseconds, then hex fields hostname,
# authorized_keys, machine-id, RNG seed, SSH host key, its public line. It answers
# "NONCE ok" or "NONCE error: why" in ANSWER (written whole, then renamed).
HELPER = r"""
use strict; use warnings; umask 077;
my ($dir, $fifo, $answer, $settime) = @ARGV;
mkdir $dir, 0700; unlink $fifo;
system("mkfifo", "-m", "0600", $fifo) == 0 or die "mkfifo: $?";
sub put { my ($path, $data, $mode) = @_;
  open(my $f, ">", "$path.tt") or die "$path: $!"; print $f $data; close $f or die "$path: $!";
  chmod $mode, "$path.tt"; rename "$path.tt", $path or die "$path: $!"; }
sub hx { pack("H*", $_[0]) }
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
open(my $in, "+<", $fifo) or die "$fifo: $!";
while (defined(my $line = <$in>)) {
  chomp $line;
  my ($nonce, $s, $us, $host, $keys, $mid, $seed, $key, $pub) = split / /, $line;
  my $ok = eval {
    syscall($settime, pack("l!l!", $s, $us), 0) == 0 or die "settimeofday: $!";
    open(my $r, ">", "/dev/urandom") or die "urandom: $!";
    syswrite($r, hx($seed)); ioctl($r, 0x5207, 0) or die "reseed: $!"; close $r;
    $host = hx($host);
    open(my $h, ">", "/proc/sys/kernel/hostname") or die "hostname: $!";
    print $h $host; close $h;
    put("/etc/hostname", "$host\n", 0644);
    open(my $hosts, "<", "/etc/hosts") or die "hosts: $!"; my @l = <$hosts>; close $hosts;
    for (@l) { $_ = "127.0.1.1 $host\n" if index($_, "127.0.1.1\t") == 0
      || index($_, "127.0.1.1 ") == 0 }
    put("/etc/hosts", join("", @l), 0644);
    put("/etc/machine-id", hx($mid) . "\n", 0444);
    my $k = "/etc/ssh/ssh_host_ed25519_key";
    opendir(my $d, "/etc/ssh") or die "/etc/ssh: $!";  # no glob(): it loads a module
    unlink map { "/etc/ssh/$_" } grep { index($_, "ssh_host_") == 0
      && $_ ne "ssh_host_ed25519_key" && $_ ne "ssh_host_ed25519_key.pub" } readdir $d;
    put($k, hx($key), 0600); put("$k.pub", hx($pub), 0644);
    mkdir "/root/.ssh", 0700; put("/root/.ssh/authorized_keys", hx($keys), 0600);
    reload_sshd();
    1 };
  my $why = $@ || "unknown"; $why =~ s/\s+/ /g;
  put($answer, $ok ? "$nonce ok\n" : "$nonce error: $why\n", 0600);
  if ($ok) { unlink $fifo; last }  # one identity per clone: leave nothing running
}
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
    """In a template about to be saved: start the helper and wait until its FIFO exists.
    False when this guest cannot have one (no perl, unknown arch): clones use the script."""
    if arch not in SETTIMEOFDAY:
        return False
    agent.command(dom, "guest-exec", {
        "path": "/usr/bin/perl",
        "arg": ["-e", HELPER, HELPER_DIR, FIFO, ANSWER, str(SETTIMEOFDAY[arch])]})
    try:
        return wait_for(lambda: True if agent.exec_argv(
            dom, ["/usr/bin/test", "-p", FIFO], timeout=30).exit_code == 0 else None,
            30, interval=0.2, what="the identity helper's FIFO")
    except WaitTimeout:
        return False


def personalize(dom: libvirt.virDomain, hostname: str, keys: str) -> None:
    """A cold-booted VM: hostname and authorized keys."""
    _script(dom, "set -e" + PERSONALIZE, [hostname, keys], 30.0)


def take_new(dom: libvirt.virDomain, hostname: str, keys: str, *, helper: bool,
             timeout: float) -> None:
    """A warm clone: its own hostname, keys, machine-id, SSH host key, clock and RNG."""
    private, public = sshexec.host_key_pair(hostname)
    machine_id, seed = uuid.uuid4().hex, secrets.token_hex(64)
    if helper:
        _ask_helper(dom, hostname, keys, machine_id, seed, private, public, timeout)
        return
    _script(dom, "set -e" + NEW_IDENTITY + PERSONALIZE,
            [hostname, keys, f"{time.time():.3f}", private.decode().strip(), public,
             machine_id, seed], timeout)


def _ask_helper(dom: libvirt.virDomain, hostname: str, keys: str, machine_id: str,
                seed: str, private: bytes, public: str, timeout: float) -> None:
    nonce = secrets.token_hex(8)
    now = time.time()
    fields = [nonce, str(int(now)), str(int(now % 1 * 1e6)), hostname.encode().hex(),
              keys.encode().hex(), machine_id.encode().hex(), seed, private.hex(),
              (public + "\n").encode().hex()]
    agent.write_file(dom, FIFO, (" ".join(fields) + "\n").encode(), mode="a")

    def answered() -> bool | None:
        try:
            answer = agent.read_file(dom, ANSWER).decode(errors="replace").strip()
        except agent.AgentError:
            return None
        if not answer.startswith(nonce + " "):
            return None
        if answer != f"{nonce} ok":
            raise IdentityError(f"guest set-up failed: {answer.split(' ', 1)[1]}")
        return True

    try:
        wait_for(answered, timeout, interval=HELPER_POLL, what="guest set-up")
    except WaitTimeout:
        raise IdentityError(f"guest set-up: no answer from the helper in {timeout:.0f}s"
                            ) from None


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
