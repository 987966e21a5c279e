#!/usr/bin/env bash
# Debian packages the tests use: promtool + prometheus (package prometheus) and docker-compose
# (validates deploy/compose without a Docker engine) for deploy/; libjemalloc2, the allocator the
# CLIs choose when present (common/memory.py), so that CI runs the path users get. Idempotent: a
# no-op when they are already installed; `apt-get update` only runs when something is missing.
# (hadolint, kubectl/kustomize, kubernetes-validate and ray come from PyPI via the dev extra.)
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
have_jemalloc() { for f in /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2; do
  [ -e "$f" ] && return 0; done; return 1; }
have_jemalloc || need+=(libjemalloc2)
if [ ${#need[@]} -eq 0 ]; then
  echo "deploy tools present: $(promtool --version 2>&1 | head -1); $(docker-compose version --short 2>/dev/null); libjemalloc2"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d 101: do not start the packaged prometheus service; tests start their own on 127.0.0.1.
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && created=1
fi
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
[ "$created" -eq 1 ] && $SUDO rm -f "$policy"
command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null
have_jemalloc
echo "deploy tools and libjemalloc2 installed"
