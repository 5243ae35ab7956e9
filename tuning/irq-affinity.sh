#!/usr/bin/env bash
# Spread a NIC's interrupts over CPUs, optionally keeping them off the CPUs the bts-guru shards
# run on. Writes /proc/irq/N/smp_affinity_list, one CPU per IRQ, round-robin.
#
# Why: every received packet is first handled in softirq on the CPU that took the interrupt. By
# default all of a NIC's IRQs may land on a few CPUs, which then spend their time in softirq
# (`mpstat -P ALL 1`, column %soft) while the shards on them lag. Two layouts make sense:
#   - spread over all CPUs (no AVOID_CPUS): simplest; every core does its share of packet work;
#   - reserve a few CPUs for IRQs and run the shards elsewhere (systemd CPUAffinity= in
#     bts-guru.service, e.g. IRQs on 0-1, shards on 2-31): shards are never interrupted by packet
#     processing, at the cost of those cores and of cross-core wake-ups. Measure both.
# Settings do not survive a reboot, a driver reload or a link reset; irqbalance (if running)
# rewrites them. Run from a boot-time unit after the NIC is up if you keep them.
#
# RPS/XPS, briefly: a NIC with fewer RX queues than CPUs (common on VMs) funnels all packets
# through few CPUs; RPS (Receive Packet Steering, /sys/class/net/IFACE/queues/rx-*/rps_cpus)
# re-spreads that softirq work in software; --rps sets it to the same CPUs as the IRQs. XPS
# (tx-*/xps_cpus) maps sending CPUs to TX queues; most multiqueue drivers set it already, so this
# script leaves it alone. On a NIC with one queue per core RPS adds overhead: skip it there.

set -euo pipefail

readonly PROG=${0##*/}

usage() {
	cat <<EOF
Usage: $PROG [--dry-run] [--rps] [--all-nodes] IFACE [AVOID_CPUS]

  IFACE        network interface, e.g. eth0 or ens1f0
  AVOID_CPUS   CPUs to keep the IRQs off, as a cpulist: "2-31", "1,3,5-7" (default: none)
  --dry-run    print what would be written, change nothing (no root needed)
  --rps        also set rps_cpus of every RX queue to the CPUs used for the IRQs
  --all-nodes  use CPUs of every NUMA node; by default only CPUs local to the NIC are used
               when the kernel reports them (device/local_cpulist)
  -h, --help   this text
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 1
}

warn() {
	printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# Expands a cpulist ("0-3,8,10-11") into one CPU number per line.
expand_cpulist() {
	local list=$1 part lo hi
	local -a parts
	[[ -z $list ]] && return 0
	IFS=, read -r -a parts <<<"$list"
	for part in "${parts[@]}"; do
		part=${part//[[:space:]]/}
		[[ -z $part ]] && continue
		if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
			lo=${BASH_REMATCH[1]}
			hi=${BASH_REMATCH[2]}
			((lo <= hi)) || die "bad CPU range '$part'"
			seq "$lo" "$hi"
		elif [[ $part =~ ^[0-9]+$ ]]; then
			printf '%s\n' "$part"
		else
			die "bad cpulist '$list' (expected e.g. 2-31 or 1,3,5-7)"
		fi
	done
}

# Fails unless $1 is a well-formed cpulist. Runs in the calling shell, so `die` really exits
# (expand_cpulist usually runs in a process substitution, where it cannot).
check_cpulist() {
	local list=$1 part
	local -a parts
	[[ $list =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] ||
		die "bad cpulist '$list' (expected e.g. 2-31 or 1,3,5-7)"
	IFS=, read -r -a parts <<<"$list"
	for part in "${parts[@]}"; do
		if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]] && ((BASH_REMATCH[1] > BASH_REMATCH[2])); then
			die "bad CPU range '$part' in '$list'"
		fi
	done
}

# Prints the hex mask for rps_cpus: 32-bit words, most significant first, comma-separated.
cpus_to_mask() {
	local -a words=()
	local cpu w i out=""
	for cpu in "$@"; do
		w=$((cpu / 32))
		words[w]=$((${words[w]:-0} | (1 << (cpu % 32))))
	done
	# The highest word that has a CPU decides the length.
	local top=0
	for i in "${!words[@]}"; do
		((i > top)) && top=$i
	done
	for ((i = top; i >= 0; i--)); do
		if [[ -z $out ]]; then
			out=$(printf '%x' "${words[i]:-0}")
		else
			out+=$(printf ',%08x' "${words[i]:-0}")
		fi
	done
	printf '%s\n' "$out"
}

dry_run=0
rps=0
all_nodes=0
positional=()
while (($# > 0)); do
	case $1 in
	--dry-run) dry_run=1 ;;
	--rps) rps=1 ;;
	--all-nodes) all_nodes=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	--)
		shift
		positional+=("$@")
		break
		;;
	-*)
		usage >&2
		die "unknown option '$1'"
		;;
	*) positional+=("$1") ;;
	esac
	shift
done

((${#positional[@]} >= 1 && ${#positional[@]} <= 2)) || {
	usage >&2
	exit 2
}
iface=${positional[0]}
avoid=${positional[1]:-}

[[ $iface =~ ^[A-Za-z0-9_.:@-]+$ ]] || die "bad interface name '$iface'"
[[ -z $avoid ]] || check_cpulist "$avoid"
[[ -e /sys/class/net/$iface ]] || die "no such network interface '$iface' (see: ip -br link)"

if ((!dry_run)) && ((EUID != 0)); then
	die "refusing to run as uid $EUID: writing /proc/irq/*/smp_affinity_list needs root (use --dry-run to preview)"
fi

# --- Which IRQs belong to the interface --------------------------------------------------------
# 1. MSI/MSI-X vectors of its PCI device (names in /proc/interrupts often lack the interface
#    name, e.g. mlx5_comp0@pci:0000:3b:00.0). For virtio-net the vectors sit on the parent PCI
#    device and are named virtioN-input.Q / virtioN-output.Q.
# 2. Any line of /proc/interrupts whose name mentions the interface (eth0-TxRx-0, ens5-Tx-Rx-1).
declare -A irq_name=()
while IFS= read -r line; do
	[[ $line =~ ^[[:space:]]*([0-9]+): ]] || continue
	num=${BASH_REMATCH[1]}
	# The name is the last field; drivers never put spaces in it.
	irq_name[$num]=${line##* }
done </proc/interrupts

declare -A found=()
dev=""
if [[ -e /sys/class/net/$iface/device ]]; then
	dev=$(readlink -f "/sys/class/net/$iface/device")
fi
if [[ -n $dev ]]; then
	devname=${dev##*/}
	msi_dir=""
	if [[ -d $dev/msi_irqs ]]; then
		msi_dir=$dev/msi_irqs
	elif [[ $devname == virtio* && -d $dev/../msi_irqs ]]; then
		msi_dir=$dev/../msi_irqs
	fi
	if [[ -n $msi_dir ]]; then
		for f in "$msi_dir"/*; do
			[[ -e $f ]] || continue
			num=${f##*/}
			name=${irq_name[$num]:-}
			[[ -n $name ]] || continue
			# virtio: only this device's data queues, not its config vector or a sibling device.
			if [[ $devname == virtio* ]]; then
				[[ $name == "$devname"-input.* || $name == "$devname"-output.* ]] || continue
			fi
			found[$num]=$name
		done
	fi
fi
for num in "${!irq_name[@]}"; do
	name=${irq_name[$num]}
	if [[ $name == "$iface" || $name == "$iface"-* || $name == *-"$iface"-* || $name == *-"$iface" ]]; then
		found[$num]=$name
	fi
done

if ((${#found[@]} == 0)); then
	die "interface '$iface' has no IRQs in /proc/interrupts (virtual interface such as lo, a bridge or a veth, or a driver that names its IRQs differently); nothing to do"
fi
mapfile -t irqs < <(printf '%s\n' "${!found[@]}" | sort -n)

# --- Which CPUs to use -------------------------------------------------------------------------
mapfile -t online < <(expand_cpulist "$(cat /sys/devices/system/cpu/online)")
declare -A avoid_set=()
if [[ -n $avoid ]]; then
	while IFS= read -r c; do
		avoid_set[$c]=1
	done < <(expand_cpulist "$avoid")
fi

local_list=""
if ((!all_nodes)) && [[ -n $dev ]]; then
	for f in "$dev/local_cpulist" "$dev/../local_cpulist"; do
		if [[ -r $f ]]; then
			local_list=$(<"$f")
			break
		fi
	done
fi
declare -A local_set=()
if [[ -n $local_list ]]; then
	while IFS= read -r c; do
		local_set[$c]=1
	done < <(expand_cpulist "$local_list")
fi

pick_cpus() {
	local use_local=$1 c
	for c in "${online[@]}"; do
		[[ -n ${avoid_set[$c]:-} ]] && continue
		if ((use_local)) && [[ -z ${local_set[$c]:-} ]]; then
			continue
		fi
		printf '%s\n' "$c"
	done
}

cpus=()
if ((${#local_set[@]} > 0)); then
	mapfile -t cpus < <(pick_cpus 1)
	if ((${#cpus[@]} == 0)); then
		warn "every CPU local to $iface (NUMA: $local_list) is in AVOID_CPUS; using CPUs of other nodes"
	fi
fi
if ((${#cpus[@]} == 0)); then
	mapfile -t cpus < <(pick_cpus 0)
fi
((${#cpus[@]} > 0)) || die "no online CPU left after removing AVOID_CPUS '$avoid'"

echo "interface $iface: ${#irqs[@]} IRQ(s); CPUs for IRQs: $(
	IFS=,
	echo "${cpus[*]}"
)${avoid:+ (avoiding $avoid)}${local_list:+ (NIC-local CPUs: $local_list)}"
if ((${#irqs[@]} > ${#cpus[@]})); then
	echo "note: more IRQs than CPUs; some CPUs take several IRQs"
fi
if pidof irqbalance >/dev/null 2>&1; then
	warn "irqbalance is running and will move these IRQs again; stop it (systemctl disable --now irqbalance) or ban the shard CPUs with IRQBALANCE_BANNED_CPULIST in its config"
fi

# --- Apply -------------------------------------------------------------------------------------
failures=0
i=0
for irq in "${irqs[@]}"; do
	cpu=${cpus[i % ${#cpus[@]}]}
	i=$((i + 1))
	target=/proc/irq/$irq/smp_affinity_list
	current=$(cat "$target" 2>/dev/null || echo '?')
	if ((dry_run)); then
		printf 'would write %-4s to %-34s (%s, now %s)\n' "$cpu" "$target" "${found[$irq]}" "$current"
	elif printf '%s\n' "$cpu" >"$target" 2>/dev/null; then
		printf 'wrote %-4s to %-34s (%s, was %s)\n' "$cpu" "$target" "${found[$irq]}" "$current"
	else
		# Kernel-managed IRQs (some multiqueue drivers) refuse changes with EIO; that is expected.
		warn "kernel refused $target for ${found[$irq]} (managed IRQ?); left at $current"
		failures=$((failures + 1))
	fi
done

if ((rps)); then
	mask=$(cpus_to_mask "${cpus[@]}")
	shopt -s nullglob
	queues=("/sys/class/net/$iface"/queues/rx-*/rps_cpus)
	shopt -u nullglob
	((${#queues[@]} > 0)) || warn "$iface has no rx queues with rps_cpus; RPS not set"
	for q in "${queues[@]}"; do
		current=$(cat "$q" 2>/dev/null || echo '?')
		if ((dry_run)); then
			printf 'would write %s to %s (now %s)\n' "$mask" "$q" "$current"
		elif printf '%s\n' "$mask" >"$q" 2>/dev/null; then
			printf 'wrote %s to %s (was %s)\n' "$mask" "$q" "$current"
		else
			warn "could not write $q"
			failures=$((failures + 1))
		fi
	done
fi

if ((dry_run)); then
	echo "dry run: nothing was changed"
fi
if ((failures > 0)); then
	die "$failures write(s) failed"
fi
