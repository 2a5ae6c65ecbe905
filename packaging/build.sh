#!/bin/bash
# Build the scistreamd distribution packages from this tree.
#
#   packaging/build.sh [--outdir DIR] deb|rpm|all   build dist/*.deb and/or dist/*.rpm
#   packaging/build.sh [--outdir DIR] lint          lintian, rpmspec -P and rpmlint on them
#   packaging/build.sh check-version                only check that all version numbers agree
#
# Builds happen in a throw-away copy of the tree (the work tree stays clean),
# with the system toolchain only: PATH=/usr/sbin:/usr/bin:/sbin:/bin and no
# Python environment variables, because a pyenv/venv python3 breaks pybuild.
#
# One version number: scistreamd/__init__.py __version__. debian/changelog and
# the spec's Version: must agree with it (checked here, so they cannot drift).
# PKG_VERSION=X.Y.Z+foo builds packages with another version without touching
# the tree (the copy gets a new changelog entry, Version: and __version__);
# the install test uses it to make an "upgrade" package. KEEP_WORK=1 keeps
# the build directory (its path is printed) for debugging.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=$ROOT/dist
SYS_PATH=/usr/sbin:/usr/bin:/sbin:/bin

die() {
    echo "packaging/build.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- versions -----------------------------------------------------------------

tree_version() {
    sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$ROOT/scistreamd/__init__.py"
}

changelog_version() {
    # First line: "scistreamd (VERSION) dist; urgency=..."
    sed -n '1s/^scistreamd (\([^)]*\)).*/\1/p' "$ROOT/packaging/debian/changelog"
}

spec_version() {
    sed -n 's/^Version: *//p' "$ROOT/packaging/rpm/scistreamd.spec" | head -n1
}

check_version() {
    local v c s
    v=$(tree_version)
    [ -n "$v" ] || die "no __version__ = \"...\" line in scistreamd/__init__.py"
    c=$(changelog_version)
    s=$(spec_version)
    [ "$c" = "$v" ] || die "packaging/debian/changelog is at version '$c' but" \
        "scistreamd/__init__.py says '$v': add a changelog entry for $v" \
        "(dch -v $v, or edit the first line of packaging/debian/changelog)"
    [ "$s" = "$v" ] || die "packaging/rpm/scistreamd.spec has 'Version: $s' but" \
        "scistreamd/__init__.py says '$v': set 'Version: $v' and add a %changelog entry"
    echo "$v"
}

# --- staging ------------------------------------------------------------------

# Copy the tree's source files (tracked and untracked-but-not-ignored; never
# dist/, caches or .git) to $1.
copy_tree() {
    local dest=$1
    mkdir -p "$dest"
    if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do
                case /$f in
                    /dist/* | */__pycache__/* | */.hypothesis/* | */.pytest_cache/* \
                        | */.ruff_cache/* | *.egg-info/*) continue ;;
                esac
                # Deleted-but-still-tracked files are listed too; skip them.
                if [ -e "$f" ]; then printf '%s\0' "$f"; fi
            done \
            | tar --null -T - -cf -) | tar -xf - -C "$dest"
    else
        tar -C "$ROOT" -cf - --exclude=./.git --exclude=./dist --exclude=__pycache__ \
            --exclude=.hypothesis --exclude=.pytest_cache --exclude=.ruff_cache \
            --exclude='*.egg-info' --exclude=./build . | tar -xf - -C "$dest"
    fi
}

# Give the staged copy $1 the package version $2 (the tree's version unless
# PKG_VERSION was set), and stamp the man pages with it.
set_version() {
    local src=$1 version=$2 tree
    tree=$(tree_version)
    if [ "$version" != "$tree" ]; then
        sed -i "s/^__version__ *= *\"[^\"]*\"/__version__ = \"$version\"/" \
            "$src/scistreamd/__init__.py"
        {
            printf 'scistreamd (%s) unstable; urgency=medium\n\n' "$version"
            printf '  * Rebuild of %s as %s (PKG_VERSION).\n\n' "$tree" "$version"
            printf ' -- %s  %s\n\n' \
                "$(sed -n 's/^Maintainer: //p' "$ROOT/packaging/debian/control")" \
                "$(date -R)"
            cat "$ROOT/packaging/debian/changelog"
        } >"$src/packaging/debian/changelog"
        sed -i "s/^Version: .*/Version:        $version/" "$src/packaging/rpm/scistreamd.spec"
    fi
    # The .TH line names the version the page documents.
    sed -i "1,/^\.TH/s/\"scistreamd [^\"]*\"/\"scistreamd $version\"/" "$src"/docs/man/*.[0-9]
}

# Run a build command with the system toolchain and a clean environment.
sysenv() {
    env -i PATH=$SYS_PATH HOME="${HOME:-/root}" TMPDIR="${TMPDIR:-/tmp}" LC_ALL=C.UTF-8 \
        ${DEB_BUILD_OPTIONS:+DEB_BUILD_OPTIONS="$DEB_BUILD_OPTIONS"} \
        ${SOURCE_DATE_EPOCH:+SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH"} \
        "$@"
}

need() {
    local missing=()
    for tool in "$@"; do
        PATH=$SYS_PATH command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run 'make packaging-deps' (as root)"
}

# --- builds -------------------------------------------------------------------

build_deb() {
    local work=$1 version=$2 src
    need dpkg-buildpackage dh dh_python3 python3
    src=$work/deb/scistreamd-$version
    copy_tree "$src"
    set_version "$src" "$version"
    cp -a "$src/packaging/debian" "$src/debian"
    echo "== building scistreamd $version .deb in $src"
    (cd "$src" && sysenv dpkg-buildpackage --build=full --no-sign) \
        >"$work/deb.log" 2>&1 || {
        tail -n 60 "$work/deb.log" >&2
        die "dpkg-buildpackage failed (full log above, last 60 lines)"
    }
    mkdir -p "$OUTDIR"
    # The .deb, and the source package + .changes that 'lint' checks with lintian.
    rm -f "$OUTDIR"/scistreamd_*
    local f
    for f in "$work"/deb/scistreamd_"$version"*; do
        case $f in
            *.deb | *.dsc | *.tar.* | *.changes | *.buildinfo) cp "$f" "$OUTDIR/" ;;
        esac
    done
    echo "built $OUTDIR/scistreamd_${version}_all.deb"
}

build_rpm() {
    local work=$1 version=$2 top name
    need rpmbuild python3
    name=scistreamd-$version
    top=$work/rpmbuild
    mkdir -p "$top"/{SOURCES,SPECS}
    copy_tree "$work/rpm/$name"
    set_version "$work/rpm/$name" "$version"
    tar -C "$work/rpm" -czf "$top/SOURCES/$name.tar.gz" "$name"
    # Separate sources as in a Fedora dist-git: %sysusers_create_compat reads
    # its file while the spec is parsed, before the tarball is unpacked.
    cp "$work/rpm/$name/etc/sysusers.d/scistream.conf" "$top/SOURCES/scistreamd.sysusers"
    cp "$work/rpm/$name/packaging/rpm/scistreamd.spec" "$top/SPECS/"
    echo "== building scistreamd $version .rpm in $top"
    # --nodeps: on a Debian host the rpm database is empty, so BuildRequires
    # cannot be satisfied there; the Fedora/RHEL names stay in the spec.
    # Debian's brp-compress says #!/bin/sh but needs bash (read -d); run it
    # with bash so man pages are compressed as on Fedora.
    sysenv rpmbuild -ba --nodeps --define "_topdir $top" \
        --define "__brp_compress /bin/bash %{_rpmconfigdir}/brp-compress %{?_prefix}" \
        "$top/SPECS/scistreamd.spec" \
        >"$work/rpm.log" 2>&1 || {
        tail -n 60 "$work/rpm.log" >&2
        die "rpmbuild failed (full log above, last 60 lines)"
    }
    mkdir -p "$OUTDIR"
    rm -f "$OUTDIR"/scistreamd-*.rpm
    cp "$top"/RPMS/noarch/scistreamd-"$version"-*.noarch.rpm "$OUTDIR/"
    cp "$top"/SRPMS/scistreamd-"$version"-*.src.rpm "$OUTDIR/"
    echo "built $(ls "$OUTDIR"/scistreamd-"$version"-*.noarch.rpm)"
}

# --- lint ---------------------------------------------------------------------

lint() {
    local status=0 found changes rpms
    need lintian rpmspec rpmlint
    found=("$OUTDIR"/scistreamd_*.changes)
    [ -e "${found[0]}" ] || die "no $OUTDIR/scistreamd_*.changes: run 'make deb' first"
    changes=${found[0]}
    echo "== lintian $changes"
    # Errors and warnings fail; info is shown. Overrides live in
    # packaging/debian/*lintian-overrides, each with its reason.
    sysenv lintian --fail-on error,warning --info --display-level '>=pedantic' "$changes" || status=1

    echo "== rpmspec -P packaging/rpm/scistreamd.spec"
    sysenv rpmspec -P "$ROOT/packaging/rpm/scistreamd.spec" >/dev/null || status=1

    rpms=("$OUTDIR"/scistreamd-*.rpm)
    [ -e "${rpms[0]}" ] || die "no $OUTDIR/scistreamd-*.rpm: run 'make rpm' first"
    echo "== rpmlint"
    # rpmlint exits non-zero on errors only; warnings are shown. Filters live
    # in packaging/rpm/scistreamd.rpmlintrc, each with its reason.
    sysenv rpmlint -r "$ROOT/packaging/rpm/scistreamd.rpmlintrc" \
        "$ROOT/packaging/rpm/scistreamd.spec" "${rpms[@]}" || status=1
    return $status
}

# --- main ---------------------------------------------------------------------

main() {
    local what version work
    while [ $# -gt 0 ]; do
        case $1 in
            --outdir) OUTDIR=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
            -h | --help) usage ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) break ;;
        esac
    done
    [ $# -eq 1 ] || usage
    what=$1
    version=$(check_version)
    case $what in
        check-version)
            echo "scistreamd $version: __init__.py, debian/changelog and the spec agree"
            return 0
            ;;
        lint)
            lint
            return
            ;;
        deb | rpm | all) ;;
        *) usage ;;
    esac
    version=${PKG_VERSION:-$version}
    case $version in
        *[!0-9A-Za-z.+]* | '' | [!0-9]*) die "PKG_VERSION '$version' is not a version usable by" \
            "dpkg, rpm and Python alike: use digits, letters, '.' and '+', starting with a digit" ;;
    esac
    work=$(mktemp -d "${TMPDIR:-/tmp}/scistreamd-pkg.XXXXXX")
    if [ -n "${KEEP_WORK:-}" ]; then
        echo "keeping the build directory $work (KEEP_WORK is set)"
    else
        # shellcheck disable=SC2064
        trap "rm -rf '$work'" EXIT
    fi
    case $what in
        deb) build_deb "$work" "$version" ;;
        rpm) build_rpm "$work" "$version" ;;
        all)
            build_deb "$work" "$version"
            build_rpm "$work" "$version"
            ;;
    esac
}

main "$@"
