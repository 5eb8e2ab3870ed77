#!/usr/bin/env bash
# Prepare this machine to run ttserver and the test suite. Idempotent: a second run only
# checks. Needs root (apt, libvirtd, /dev/kvm). Images are cached under $TTSTACK_IMAGE_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_PATH=${TTSTACK_IMAGE_PATH:-/var/lib/ttstack/images}
IMAGES=${TTSTACK_IMAGES:-"debian-12 debian-13"}
PYTHON=${PYTHON:-python3}

say() { echo "[setup] $*"; }

# Only the emulator we use: libvirtd probes every installed qemu-system-* on first connect.
# systemd-container: systemd-nspawn, the lxc engine's runtime (ttserver/containers).
APT_PACKAGES="qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
  pkg-config gcc mmdebstrap e2fsprogs nftables iproute2 openssh-client procps
  dnsmasq-base util-linux btrfs-progs dosfstools mtools fdisk zfs-fuse git rsync systemd
  systemd-container"
# Opt-in foreign-arch guests (tests/test_multiarch.py): every emulator of ttclient/arches.py
# (qemu_package; a test keeps this list in step), qemu-user for building their images.
if [ "${TTSTACK_FOREIGN_TESTS:-}" = 1 ]; then
  APT_PACKAGES="$APT_PACKAGES qemu-system-arm qemu-system-ppc qemu-system-misc
  qemu-user-static arch-test"
fi
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  say "installing: $(echo $missing)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# libvirt checks /dev/kvm as the qemu user; if only root can open it, libvirt re-probes QEMU
# on every call (about a minute per VM start). Debian's udev rule would set root:kvm 0660.
if [ -e /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
  say "setting /dev/kvm to root:kvm 0660 (as Debian's udev rule does)"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# No systemd here: start the daemons by hand when they are not running.
pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
if ! pgrep -x libvirtd >/dev/null; then
  say "starting libvirtd"
  libvirtd -d
fi
for _ in $(seq 1 120); do
  timeout 90 virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 1
done
timeout 90 virsh -c qemu:///system version >/dev/null || { echo "libvirtd does not answer" >&2; exit 1; }

# ZFS for the storage tests: the kernel's if it has it, else zfs-fuse (no module loading
# on these hosts). Its daemon serves `zfs`/`zpool`; pools are made by the tests.
if [ ! -e /dev/zfs ] && command -v zfs-fuse >/dev/null && ! pgrep -x zfs-fuse >/dev/null; then
  say "starting zfs-fuse"
  zfs-fuse --no-kstat-mount || say "zfs-fuse did not start: the ZFS storage test will skip"
  for _ in $(seq 1 30); do zpool list >/dev/null 2>&1 && break; sleep 0.5; done
fi

# Install from *this* checkout unless it is already the one installed (CI clones elsewhere).
here=$(pwd)
installed=$("$PYTHON" -c "import ttserver, libvirt, fastapi, pytest_timeout, os;
print(os.path.dirname(os.path.dirname(os.path.abspath(ttserver.__file__))))" 2>/dev/null || true)
# reinstall when the checkout moved or its dependencies changed (pyproject.toml)
stamp=/var/lib/ttstack/.pip-stamp
want="$here $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$installed" != "$here" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "pip install -e .[server,proxy,test]"
  "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[server,proxy,test]"
  mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
fi

# The packaging test installs the built wheel into clean venvs without the network: a
# wheelhouse of every dependency of the client, [pytest] and [server] extras (libvirt-python
# built once here, from libvirt-dev), remade when pyproject.toml changes.
WHEELHOUSE=/var/lib/ttstack/wheelhouse
deps=$(sha256sum pyproject.toml | cut -d' ' -f1)  # not the checkout's path: CI clones move
if [ "$(cat "$WHEELHOUSE/.stamp" 2>/dev/null)" != "$deps" ]; then
  say "pip wheel: the dependencies' wheelhouse in $WHEELHOUSE"
  rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
  "$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$WHEELHOUSE" ".[server,pytest]"
  rm -f "$WHEELHOUSE"/ttstack-*.whl && echo "$deps" > "$WHEELHOUSE/.stamp"
fi

# gitlab-ci-local runs the GitLab component in the CI template tests (it needs rsync and
# git); 4.60.0 is the newest that runs on Debian 12's Node (the 4.7x releases need Node 22)
GITLAB_CI_LOCAL_VERSION=4.60.0
if ! command -v npm >/dev/null; then  # a host's own Node (e.g. NodeSource's) is kept
  say "installing: nodejs npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ "$(gitlab-ci-local --version 2>/dev/null)" != "$GITLAB_CI_LOCAL_VERSION" ]; then
  say "npm install -g gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION"
  npm install -g --no-fund --no-audit --loglevel=error "gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION" >/dev/null
fi

for os in $IMAGES; do
  ttserver image build "$os" --image-path "$IMAGE_PATH" --timeout 1200
done
# the container image of the first (seconds: the VM image's files, shifted; tests of the
# lxc engine use it)
ttserver image build "${IMAGES%% *}" --engine lxc --image-path "$IMAGE_PATH"
say "ready: images in $IMAGE_PATH"
