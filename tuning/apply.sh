#!/usr/bin/env bash
# Installs the bts-guru kernel tuning on THIS host:
#   high-connections.conf (or sysctl-small.conf with --small) -> /etc/sysctl.d/60-bts-guru.conf
#   limits.conf                                     -> /etc/security/limits.d/bts-guru.conf
# then runs `sysctl --system` and reads every value back.
#
# Safety rules, so that applying the profile never makes a host worse:
#   - keys that only ever need to be "at least" a value (fs.file-max, fs.nr_open, somaxconn, ...)
#     are commented out in the installed copy when the running kernel already has more (systemd
#     raises fs.file-max and fs.nr_open to the maximum on many distributions);
#   - the large profile is refused when its tcp_mem maximum exceeds 25% of this host's RAM
#     (--force overrides; better, rescale tcp_mem as high-connections.conf explains);
#   - other sysctl files that set the same keys later (and so win) are reported.
# --dry-run prints the plan and changes nothing; it does not need root.
# bts-guru.service is not installed here; tuning/README.md has those steps.

set -euo pipefail
# Byte-order comparisons of file names, as sysctl --system sorts them.
export LC_ALL=C

readonly PROG=${0##*/}
SRC_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SRC_DIR
readonly SYSCTL_DEST=/etc/sysctl.d/60-bts-guru.conf
readonly LIMITS_DEST=/etc/security/limits.d/bts-guru.conf
# Keys where a higher current value is never lowered.
readonly RAISE_ONLY=" fs.file-max fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
net.core.netdev_max_backlog net.core.netdev_budget net.ipv4.tcp_max_tw_buckets \
net.core.rmem_max net.core.wmem_max net.netfilter.nf_conntrack_max "

usage() {
	cat <<EOF
Usage: $PROG [--small] [--dry-run] [--force]

  --small    install sysctl-small.conf (2-4 cores, a few GB RAM, <= ~20k connections)
             instead of high-connections.conf (large bare-metal host)
  --dry-run  print what would be installed and which values would change; change nothing
  --force    install the large profile even if its tcp_mem exceeds 25% of RAM
  -h, --help this text
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 1
}

warn() {
	printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# Collapses runs of blanks and tabs to one space and trims (tcp_mem reads back tab-separated).
normalize() {
	local v
	v=$(printf '%s' "$1" | tr -s ' \t' '  ')
	v=${v#" "}
	v=${v%" "}
	printf '%s' "$v"
}

small=0
dry_run=0
force=0
while (($# > 0)); do
	case $1 in
	--small) small=1 ;;
	--dry-run) dry_run=1 ;;
	--force) force=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		die "unknown argument '$1'"
		;;
	esac
	shift
done

if ((small)); then
	profile=$SRC_DIR/sysctl-small.conf
else
	profile=$SRC_DIR/high-connections.conf
fi
limits=$SRC_DIR/limits.conf
[[ -r $profile ]] || die "cannot read $profile"
[[ -r $limits ]] || die "cannot read $limits"

if ((!dry_run)) && ((EUID != 0)); then
	die "refusing to run as uid $EUID: installing into /etc and running sysctl --system needs root (use --dry-run to preview)"
fi

# --- Read the profile and compare it with the running kernel -----------------------------------
staged=$(mktemp)
trap 'rm -f "$staged"' EXIT

keys=()
declare -A want=() optional_key=()
printf '# Installed by bts-guru tuning/apply.sh from %s on %s.\n' "${profile##*/}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$staged"

echo "profile: $profile"
printf '%-42s %-26s %-26s %s\n' KEY CURRENT PROFILE ACTION
missing_required=0
while IFS= read -r line || [[ -n $line ]]; do
	if [[ ! $line =~ ^[[:space:]]*(-?)([A-Za-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
		printf '%s\n' "$line" >>"$staged"
		continue
	fi
	optional=${BASH_REMATCH[1]}
	key=${BASH_REMATCH[2]}
	value=$(normalize "${BASH_REMATCH[3]}")
	path=/proc/sys/${key//.//}
	action=""
	current="-"
	if [[ ! -e $path ]]; then
		if [[ -n $optional ]]; then
			action="absent on this kernel (optional: ignored)"
		else
			action="ABSENT on this kernel: sysctl --system will report an error"
			missing_required=$((missing_required + 1))
		fi
	else
		current=$(normalize "$(cat "$path" 2>/dev/null || echo '?')")
		if [[ $RAISE_ONLY == *" $key "* && $current =~ ^[0-9]+$ && $value =~ ^[0-9]+$ ]] &&
			((current > value)); then
			action="keep current (higher): line commented out"
			line="# $line  (apply.sh: the running value $current is higher and was kept)"
		else
			if [[ $current == "$value" ]]; then
				action="unchanged"
			else
				action="change"
			fi
			keys+=("$key")
			want[$key]=$value
			[[ -z $optional ]] || optional_key[$key]=1
		fi
	fi
	printf '%s\n' "$line" >>"$staged"
	printf '%-42s %-26s %-26s %s\n' "$key" "$current" "$value" "$action"
done <"$profile"
((missing_required == 0)) || warn "$missing_required required key(s) do not exist on this kernel ($(uname -r))"

# --- tcp_mem guard (large profile) -------------------------------------------------------------
if [[ -n ${want[net.ipv4.tcp_mem]:-} ]]; then
	read -r _ _ mem_max_pages <<<"${want[net.ipv4.tcp_mem]}"
	page_size=$(getconf PAGESIZE)
	mem_total_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
	tcp_max_mib=$((mem_max_pages * page_size / 1048576))
	ram_mib=$((mem_total_kib / 1024))
	if ((tcp_max_mib * 4 > ram_mib)); then
		msg="net.ipv4.tcp_mem allows up to ${tcp_max_mib} MiB of TCP buffers, more than 25% of this host's ${ram_mib} MiB of RAM; rescale it (see the comment in ${profile##*/}) or use --small"
		if ((force)); then
			warn "$msg (continuing: --force)"
		elif ((dry_run)); then
			warn "$msg (a real run would stop here; --force overrides)"
		else
			die "$msg (--force overrides)"
		fi
	fi
fi

# --- Later files that override ours ------------------------------------------------------------
ours=${SYSCTL_DEST##*/}
declare -A seen_file=()
for f in /etc/sysctl.d/*.conf /run/sysctl.d/*.conf /usr/local/lib/sysctl.d/*.conf \
	/usr/lib/sysctl.d/*.conf /lib/sysctl.d/*.conf /etc/sysctl.conf; do
	[[ -f $f ]] || continue
	real=$(readlink -f "$f")
	[[ -n ${seen_file[$real]:-} ]] && continue
	seen_file[$real]=1
	base=${f##*/}
	[[ $base == "$ours" ]] && continue
	# /etc/sysctl.conf is applied last; other files in lexicographic order of their names.
	if [[ $f != /etc/sysctl.conf && ! $base > $ours ]]; then
		continue
	fi
	for key in "${keys[@]}"; do
		if grep -Eq "^[[:space:]]*-?${key//./[./]}[[:space:]]*=" "$f"; then
			warn "$f also sets $key and is applied after $ours, so its value wins"
		fi
	done
done

# --- Install -----------------------------------------------------------------------------------
if ((dry_run)); then
	echo
	echo "would install: $profile -> $SYSCTL_DEST (with the changes above)"
	echo "would install: $limits -> $LIMITS_DEST"
	echo "would run:     sysctl --system, then read every value back"
	echo "dry run: nothing was changed"
	exit 0
fi

install -D -m 0644 "$staged" "$SYSCTL_DEST"
echo "installed $SYSCTL_DEST"
install -D -m 0644 "$limits" "$LIMITS_DEST"
echo "installed $LIMITS_DEST (applies to new PAM sessions; systemd units use LimitNOFILE=/LimitMEMLOCK=)"
getent passwd bts-guru >/dev/null || warn "user bts-guru does not exist yet (useradd --system --no-create-home --shell /usr/sbin/nologin bts-guru)"

echo "running: sysctl --system"
sysctl_rc=0
sysctl --quiet --system || sysctl_rc=$?
((sysctl_rc == 0)) || warn "sysctl --system exited with $sysctl_rc (see the errors above; an optional \"-\" line whose value the kernel rejects, such as bbr where it is not built, also does this); the read-back below decides"

# --- Read back ---------------------------------------------------------------------------------
mismatches=0
for key in "${keys[@]}"; do
	path=/proc/sys/${key//.//}
	got=$(normalize "$(cat "$path" 2>/dev/null || echo '?')")
	if [[ $got == "${want[$key]}" ]]; then
		continue
	elif [[ -n ${optional_key[$key]:-} ]]; then
		warn "optional $key is '$got', not '${want[$key]}' (the kernel lacks the feature?); left as is"
	else
		warn "$key is '$got', expected '${want[$key]}'"
		mismatches=$((mismatches + 1))
	fi
done
if ((mismatches > 0)); then
	die "$mismatches value(s) differ from the profile (another sysctl file, a missing module, or a kernel that refuses the value)"
fi
echo "read back ${#keys[@]} values: every required one matches the profile"
echo "note: net.core.default_qdisc only affects qdiscs created from now on; see README.md"
