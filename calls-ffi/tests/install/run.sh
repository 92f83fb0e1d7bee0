#!/usr/bin/env bash
# `make -C calls-ffi test-install`: installs libcalls into a temporary prefix and builds app.c
# against it the three ways a C project would, running each program:
#   1. pkg-config, shared: the program needs libcalls.so.0 (the SONAME) and runs with it;
#   2. pkg-config --static: libcalls.a is linked in, the program needs no libcalls at run time;
#   3. CMake find_package(calls): calls::calls (shared) and calls::static.
# Then `make uninstall` must leave no file behind.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ffi=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
cc=${CC:-cc}

make -C "$ffi" --no-print-directory install PREFIX="$prefix" PROFILE="${PROFILE:-debug}"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
version=$(pkg-config --modversion calls)

echo "== installed: SONAME and version links"
readelf -d "$prefix/lib/libcalls.so.$version" | grep 'SONAME.*\[libcalls.so.0\]'
[ "$(readlink "$prefix/lib/libcalls.so.0")" = "libcalls.so.$version" ]
[ "$(readlink "$prefix/lib/libcalls.so")" = "libcalls.so.0" ]

needs_libcalls() { readelf -d "$1" | grep -q 'NEEDED.*\[libcalls\.so\.0\]'; }

echo "== 1. pkg-config, shared"
# shellcheck disable=SC2046  # pkg-config's output is meant to be split
"$cc" -o "$work/app-shared" "$here/app.c" $(pkg-config --cflags --libs calls)
needs_libcalls "$work/app-shared"
if "$work/app-shared" 2>/dev/null; then
    echo "the shared program ran without libcalls on the library path" >&2
    exit 1
fi
LD_LIBRARY_PATH=$prefix/lib "$work/app-shared"

echo "== 2. pkg-config --static"
# shellcheck disable=SC2046
"$cc" -o "$work/app-static" "$here/app.c" $(pkg-config --cflags --libs --static calls)
if readelf -d "$work/app-static" | grep -q 'NEEDED.*libcalls'; then
    echo "--static linked the shared libcalls" >&2
    exit 1
fi
"$work/app-static"

echo "== 3. CMake find_package(calls)"
for kind in shared static; do
    static=$([ "$kind" = static ] && echo ON || echo OFF)
    cmake -S "$here" -B "$work/cmake-$kind" -DCMAKE_PREFIX_PATH="$prefix" -DCALLS_STATIC="$static" \
        -DCMAKE_C_COMPILER="$cc" >/dev/null
    cmake --build "$work/cmake-$kind" >/dev/null
    if [ "$kind" = shared ]; then
        needs_libcalls "$work/cmake-$kind/app"
    elif needs_libcalls "$work/cmake-$kind/app"; then
        echo "calls::static linked the shared libcalls" >&2
        exit 1
    fi
    # CMake records the imported library's directory as the build tree's RPATH.
    "$work/cmake-$kind/app"
done

echo "== make uninstall"
make -C "$ffi" --no-print-directory uninstall PREFIX="$prefix" PROFILE="${PROFILE:-debug}"
left=$(find "$prefix" -type f -o -type l)
if [ -n "$left" ]; then
    echo "make uninstall left: $left" >&2
    exit 1
fi
echo "installed libcalls: shared, static and CMake builds ran"
