#!/usr/bin/env bash
# Installs the Debian packages ds4 builds against, when their headers are
# missing. Runs once per build tree (make's build/.deps-ok stamp).
set -euo pipefail
need=()
check() { # header package
    if ! echo "#include <$1>" | ${CC:-cc} -E -x c - >/dev/null 2>&1; then need+=("$2"); fi
}
check pcre2.h libpcre2-dev
check jansson.h libjansson-dev
check microhttpd.h libmicrohttpd-dev
check histedit.h libedit-dev
check openssl/sha.h libssl-dev
command -v clang >/dev/null || need+=(clang)
[ -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ] || \
  ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || need+=(libclang-rt-14-dev)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "ds4: installing Debian packages: ${need[*]}"
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
