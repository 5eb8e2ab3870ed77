"""A warm clone's identity request, as its helper reads it from its port: the layout,
decoded by perl with the helper's own unpack template (pure logic; perl is on the host)."""

import shutil
import struct
import subprocess

import pytest

from ttserver.guest.identity import HELPER, MAX_REQUEST, IdentityError, NewIdentity

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="needs perl")

DECODE = r"""
local $/; binmode STDIN; my $d = <STDIN>;
die "magic" unless substr($d, 0, 4) eq "TTID";
my $need = 24 + unpack("N", substr($d, 20, 4));
my @f = unpack("(N/a*)8", substr($d, 24, $need - 24));
print join("\n", substr($d, 4, 16), map { unpack("H*", $_) } @f), "\n";
"""


def test_the_helper_reads_every_field_back():
    new = NewIdentity("env-0", "ssh-ed25519 AAAA a@b\nssh-rsa BBBB c@d\n",
                      host_key=(b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n", "ssh-ed25519 K"))
    blob = new.request(1700000000.25)
    assert "(N/a*)8" in HELPER and "substr($d, 20, 4)" in HELPER  # the same layout
    out = subprocess.run(["perl", "-e", DECODE], input=blob, capture_output=True,
                         check=True).stdout.decode().split("\n")
    nonce, *fields = out[:9]
    assert nonce == new.nonce
    decoded = [bytes.fromhex(f) for f in fields]
    assert decoded == [b"1700000000", b"250000", b"env-0", new.keys.encode(),
                       new.machine_id.encode(), new.seed, new.host_key[0],
                       b"ssh-ed25519 K\n"]
    assert len(new.seed) == 64 and len(new.machine_id) == 32


def test_identities_differ_and_too_many_keys_is_an_error():
    a, b = NewIdentity("h", "k"), NewIdentity("h", "k")
    assert (a.nonce, a.machine_id, a.seed) != (b.nonce, b.machine_id, b.seed)
    blob = a.request(0)
    header = blob[:24]
    assert header[:4] == b"TTID" and struct.unpack(">I", header[20:])[0] == len(blob) - 24
    with pytest.raises(IdentityError, match="exceeds the helper's 65536 bytes"):
        NewIdentity("h", "k" * MAX_REQUEST).request(0)


@pytest.fixture()
def port(tmp_path):
    """A UNIX socket standing in for QEMU's end of a clone's identity port: yields its
    path and the accepted connection (as the guest's helper sees the stream)."""
    import socket
    import threading

    path = str(tmp_path / "identity.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    thread.start()
    yield path, accepted, thread
    for conn in accepted:
        conn.close()
    listener.close()


def test_the_channel_sends_the_request_and_reads_the_helpers_answer(port):
    from ttserver.guest.identity import Channel

    path, accepted, thread = port
    new = NewIdentity("env-0", "k\n")
    channel = Channel(path)
    channel.offer(new)
    thread.join(5)
    guest = accepted[0]
    got = b""
    while len(got) < 24 or len(got) < 24 + struct.unpack(">I", got[20:24])[0]:
        got += guest.recv(65536)
    assert got[:20] == b"TTID" + new.nonce.encode()
    # the answer may come in pieces, after other output
    guest.sendall(b"noise\nttstack-identity " + new.nonce.encode() + b" o")
    guest.sendall(b"k\n")
    channel.answer(new.nonce, timeout=5)
    channel.close()


def test_the_channel_reports_the_helpers_error_its_silence_and_a_closed_port(port):
    from ttserver.guest.identity import Channel

    path, accepted, thread = port
    channel = Channel(path)
    thread.join(5)
    accepted[0].sendall(b"ttstack-identity 00aa error: settimeofday: Operation not"
                        b" permitted\n")
    with pytest.raises(IdentityError, match="guest set-up failed: settimeofday: Operation"):
        channel.answer("00aa", timeout=5)
    with pytest.raises(IdentityError, match="no answer from the helper in 0s"):
        channel.answer("00bb", timeout=0.2)
    accepted[0].close()
    with pytest.raises(IdentityError, match="the identity port closed without an answer"):
        channel.answer("00bb", timeout=5)
    channel.close()
    channel.close()  # idempotent
