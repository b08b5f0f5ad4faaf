#!/bin/sh
# Test guest for tests/vmm, put in place of hangar's init on top of hangar's base
# initramfs (busybox, virtio modules). It speaks the guest contract (control and signal
# ports) and acts as the kernel command line says:
#   hangar_test.mode=exit   report ready, then exit with hangar_test.code
#   hangar_test.mode=serve  report ready, then act on "signal N" lines: exit with 128+N,
#                           or with hangar_test.term=ignore report SIGTERM and carry on
#   hangar_test.deadline=S  reboot (which ends QEMU, as it runs with -no-reboot) after S
#                           seconds whatever happens, so no test QEMU outlives its test
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
  [ -n "$module" ] && insmod "/lib/modules/$module"
done < /etc/hangar/modules

mode=exit; code=0; term=exit; deadline=300
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hangar_test.mode=*) mode="${arg#*=}" ;;
    hangar_test.code=*) code="${arg#*=}" ;;
    hangar_test.term=*) term="${arg#*=}" ;;
    hangar_test.deadline=*) deadline="${arg#*=}" ;;
  esac
done

# Ports appear shortly after virtio_console loads.
find_port() {
  tries=0
  while [ "$tries" -lt 100 ]; do
    for port in /sys/class/virtio-ports/*; do
      if [ -e "$port/name" ] && [ "$(cat "$port/name")" = "$1" ] && [ -e "/dev/${port##*/}" ]; then
        echo "/dev/${port##*/}"
        return 0
      fi
    done
    tries=$((tries + 1))
    sleep 0.1
  done
  return 1
}
ctl=$(find_port hangar.ctl)
sig=$(find_port hangar.sig)
emit() { echo "$1" > "$ctl"; }
finish() {
  emit "{\"type\":\"exit\",\"code\":$1}"
  reboot -f
}

( sleep "$deadline"; emit '{"type":"error","message":"test guest deadline passed"}'; reboot -f ) &

# Open the signal port before saying ready, so that a host that waits for ready and then
# signals finds someone reading.
exec 3< "$sig"
read_only_flags=$(for disk in /sys/block/vd*; do printf '%s,' "$(cat "$disk/ro")"; done)
emit "{\"type\":\"disks\",\"read_only\":[${read_only_flags%,}]}"
emit '{"type":"ready"}'
[ "$mode" = exit ] && finish "$code"

# Reading the port gives end-of-file while no host is connected to it: wait and read on.
while :; do
  if ! read -r word signum <&3; then
    sleep 0.1
    continue
  fi
  [ "$word" = signal ] || continue
  if [ "$signum" = 15 ] && [ "$term" = ignore ]; then
    emit "{\"type\":\"signal\",\"signum\":$signum,\"action\":\"ignored\"}"
  else
    finish $((128 + signum))
  fi
done
