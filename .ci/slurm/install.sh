#!/usr/bin/env bash
# Debian 12 packages for tests/helpers/slurm.py: a real single-node SLURM 22.05 (munge, slurmctld, slurmd,
# client commands) plus slurmdbd over MariaDB so that `sacct` works (submitit polls job states with sacct).
# Runs as root; ~25 s on a clean machine; a no-op when everything is already installed.
# The packages' own services are not started (policy-rc.d); the helper starts private daemons itself.
set -euo pipefail
PKGS=(munge slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core)
if dpkg-query -W -f='${Status}\n' "${PKGS[@]}" 2>/dev/null | grep -vq '^install ok installed$' \
   || [ "$(dpkg-query -W -f='${Status}\n' "${PKGS[@]}" 2>/dev/null | wc -l)" -ne "${#PKGS[@]}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep postinst from starting system-wide munged/slurm daemons
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${PKGS[@]}"
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
