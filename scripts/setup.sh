#!/usr/bin/env bash
# Installs the system packages the build (and, with "tests", the tests) need when they are missing,
# from Debian's archive: a C compiler (zstd-sys builds libzstd), pkg-config and libcurl's and
# OpenSSL's headers (gix's https transport links the system libcurl; without them curl-sys would
# quietly build a libcurl without TLS), and for the tests git, python3, openssl, tar, headless
# Chromium (the fleet page test takes a screenshot with it), a PostgreSQL server (the store
# tests start their own, on a temporary directory), ssh-keygen (signed-Git tests) and unshare
# (kustomize builds' network namespace); it checks that kubectl is there. Needs root, or sudo, to install.
# Usage: bash scripts/setup.sh [build|tests]
set -euo pipefail
what="${1:-build}"

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
if [ "$what" = tests ]; then
  command -v git >/dev/null || missing+=(git)
  command -v python3 >/dev/null || missing+=(python3)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v tar >/dev/null || missing+=(tar)
  # Signed-Git tests sign commits and tags with real SSH keys.
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  # Kustomize builds run in a network namespace of their own (unshare --user --net).
  command -v unshare >/dev/null || missing+=(util-linux)
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
  if [ -z "${OUTPOST_PG_BIN:-}" ] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
  else
    echo "setup: missing ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: missing ${missing[*]} (Debian package names) and this is not a Debian-like system; install their equivalents" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# kubectl is no Debian package: the install-manifest tests render with `kubectl kustomize` and
# (later) check the API test server against the real client. It is on this project's machines.
if [ "$what" = tests ] && ! command -v kubectl >/dev/null; then
  echo "setup: kubectl is missing: install kubectl v1.32 or newer (it bundles kustomize v5) from https://kubernetes.io/releases/download/ and put it on PATH; tests/tests/install.rs needs it" >&2
  exit 1
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing: install Rust 1.89 or newer (https://rustup.rs)" >&2
  exit 1
fi
