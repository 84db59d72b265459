#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine: the software Vulkan driver ManiSkill
# renders with on CPU, a .venv with the pinned packages. Idempotent: a second run with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_vulkan() {
  # ManiSkill (SAPIEN) needs a software Vulkan (lavapipe) newer than Debian bookworm's own; bookworm-backports has it.
  if [ "${SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then return; fi
  if dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q bpo; then return; fi
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    local src=/etc/apt/sources.list.d/debian.sources dst=/etc/apt/sources.list.d/backports.sources
    if [ ! -f "$dst" ]; then
      # Copy the machine's own first Debian stanza (its mirror, its keyring) and point it at bookworm-backports.
      awk 'BEGIN{RS=""; ORS="\n\n"} NR==1' "$src" \
        | sed -E 's/^Suites:.*/Suites: bookworm-backports/' | as_root tee "$dst.tmp" >/dev/null
      as_root mv "$dst.tmp" "$dst"
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
      mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
}

install_system_libs() {
  # opencv-python (cv2: every script's image code, and SAPIEN's) loads the system's libGL and glib; a minimal Debian
  # lacks them. Debian's own python3 makes venvs only with python3-venv (ensurepip).
  if [ "${SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then return; fi
  local missing=() pkg
  for pkg in libgl1 libglib2.0-0; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  "$PYTHON" -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -eq 0 ]; then return; fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python() {
  local stamp="$VENV/.requirements.sha256" want
  want="$(cat requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, so nothing later pulls another build of it.
  grep -E '^torch' requirements.txt > "$VENV/torch-requirements.txt"
  "$VENV/bin/pip" install -q -r "$VENV/torch-requirements.txt"
  "$VENV/bin/pip" install -q -r requirements.txt
  # triton segfaults when loaded after TensorFlow (both bundle LLVM); nothing here uses it (no torch.compile).
  "$VENV/bin/pip" uninstall -q -y triton 2>/dev/null || true
  if "$VENV/bin/pip" show -q datasets 2>/dev/null; then
    echo "HF 'datasets' got installed; it shadows this repo's datasets/ package" >&2; exit 1
  fi
  echo "$want" > "$stamp"
}

install_vulkan
install_system_libs
install_python
echo "setup: ready ($VENV)"
