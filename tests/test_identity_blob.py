"""A warm clone's identity request, as its helper reads it: the fw_cfg file's layout,
decoded by perl with the helper's own unpack template (pure logic; perl is on the host)."""

import shutil
import struct
import subprocess

import pytest

from ttserver.guest.identity import FW_CFG_SIZE, HELPER, IdentityError, NewIdentity

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
    blob = new.fw_cfg_blob(1700000000.25)
    assert len(blob) == FW_CFG_SIZE
    assert "(N/a*)8" in HELPER and "substr($h, 20, 4)" in HELPER  # the same layout
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
    header = a.fw_cfg_blob(0)[:24]
    assert header[:4] == b"TTID" and struct.unpack(">I", header[20:])[0] > 0
    with pytest.raises(IdentityError, match="exceeds the 65536-byte fw_cfg file"):
        NewIdentity("h", "k" * FW_CFG_SIZE).fw_cfg_blob(0)
