# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_numapin_global_optspecs
    string join \n h/help V/version
end

function __fish_numapin_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_numapin_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_numapin_using_subcommand
    set -l cmd (__fish_numapin_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c numapin -n "__fish_numapin_needs_command" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_needs_command" -s V -l version -d 'Print version'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "topology" -d 'Online NUMA nodes: CPUs, memory, hugepage pools, distances between nodes, and the PCI devices local to each'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "bind" -d 'Bind a PCI device to vfio-pci (driver_override), remembering its driver. Refuses a device the host is using (an interface that is up or routed, a mounted, held or swap block device, the boot display) unless --force; rolls back to the old driver if a step fails'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "unbind" -d 'Give a PCI device back to the driver it had before `numapin bind`. Refuses while a process holds its VFIO group or cdev open (the kernel would block the unbind until it lets go), unless --force; --wait polls for the holders to go before writing anything'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "info" -d 'The device\'s NUMA node and local CPUs, how near each node\'s memory is, its IOMMU group, container kind, IOVA ranges, page sizes and DMA mappings available'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "check" -d 'Preflight: IOMMU, vfio-pci, the device\'s group, the regions against the topology, memlock, hugepages, io_uring, NUMA balancing; each with a fix. Exits 5 (device state) when a check fails'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "pin" -d 'Allocate node-local memory, pin it through the device\'s container, print where it is, and hold the pins until a signal or timeout: a check and a reservation tool (programs use the library)'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "demo" -d 'The original failure re-enacted: mlocked, plain and numapin-pinned memory through NUMA balancing, a migration storm and compaction, with device DMA checks (needs QEMU\'s edu device: `cargo xtask demo`)'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "status" -d 'numapind\'s regions, usage per user and node, DMA mappings left'
complete -c numapin -n "__fish_numapin_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c numapin -n "__fish_numapin_using_subcommand topology" -l json -d 'Print JSON instead of a table'
complete -c numapin -n "__fish_numapin_using_subcommand topology" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand bind" -l force -d 'Go ahead although the host is using the device'
complete -c numapin -n "__fish_numapin_using_subcommand bind" -l dry-run -d 'Show the checks and every sysfs write, in order, without writing'
complete -c numapin -n "__fish_numapin_using_subcommand bind" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand unbind" -l wait -d 'Wait up to SECS seconds for the processes holding the device to close it (checked before any write), saying what it waits for' -r
complete -c numapin -n "__fish_numapin_using_subcommand unbind" -l force -d 'Go ahead although the host is using the device'
complete -c numapin -n "__fish_numapin_using_subcommand unbind" -l dry-run -d 'Show the checks and every sysfs write, in order, without writing'
complete -c numapin -n "__fish_numapin_using_subcommand unbind" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand info" -s d -l device -d 'PCI address, mdev UUID, or sysfs path' -r
complete -c numapin -n "__fish_numapin_using_subcommand info" -l backend -d 'The kernel interface to open it through: `type1` (the VFIO group in a container), `iommufd` (the VFIO cdev and /dev/iommu), or `auto` (iommufd where the kernel and device have it). Default: $NUMAPIN_BACKEND, else auto' -r
complete -c numapin -n "__fish_numapin_using_subcommand info" -l node -d 'Say whether memory on this node would be local to the device (repeatable; default: every online node)' -r
complete -c numapin -n "__fish_numapin_using_subcommand info" -s r -l region -d 'Say whether these regions\' memory would be local to the device' -r
complete -c numapin -n "__fish_numapin_using_subcommand info" -l json -d 'Print JSON instead of text'
complete -c numapin -n "__fish_numapin_using_subcommand info" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand check" -s d -l device -d 'The device to check (PCI address, mdev UUID, or sysfs path)' -r
complete -c numapin -n "__fish_numapin_using_subcommand check" -s r -l region -d 'Regions to check memlock and hugepages against (repeatable)' -r
complete -c numapin -n "__fish_numapin_using_subcommand check" -l json -d 'Print JSON instead of a table'
complete -c numapin -n "__fish_numapin_using_subcommand check" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand pin" -s d -l device -d 'PCI address (bound to vfio-pci, behind an IOMMU or in no-IOMMU mode), mdev UUID, or sysfs path. With --service: one of the daemon\'s devices (default: its first)' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l backend -d 'The kernel interface: `type1`, `iommufd` or `auto` (iommufd where the kernel and device have it). Default: $NUMAPIN_BACKEND, else auto' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l service -d 'Allocate through numapind at SOCKET instead of opening the device (default socket: /run/numapin/numapin.sock)' -r -F
complete -c numapin -n "__fish_numapin_using_subcommand pin" -s r -l region -d 'NODE:SIZE[:PAGESIZE][@IOVA], e.g. 0:512M, 1:1G:2M, 0:64M@0x100000000. Repeat for several regions' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l min-extent -d 'Fail unless every physically contiguous extent of each region is at least this long (e.g. 2M; hugepages give extents of their size)' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l hold -d 'Hold the pins this many seconds (or until SIGINT/SIGTERM), then release' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l threads -d 'Prefault threads per region (default: one per CPU of the node)' -r
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l phys -d 'Also print each region\'s physical extents (needs CAP_SYS_ADMIN; always printed for a no-IOMMU device, whose DMA addresses they are). With --service: ask numapind for them (users in its phys_users)'
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l json -d 'Print one JSON document instead of a table'
complete -c numapin -n "__fish_numapin_using_subcommand pin" -l hold-forever -d 'Hold the pins until SIGINT/SIGTERM (the default)'
complete -c numapin -n "__fish_numapin_using_subcommand pin" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand demo" -s d -l device -d 'The edu device (default: the first 1234:11e8 device)' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l size -d 'Size of each of the three regions' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l balance-secs -d 'Longest time NUMA balancing gets in phase 1, in seconds' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l samples -d 'Pages of numapin\'s region the device reads (spread over the region, first and last included; edu needs about 0.1 s per page)' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l stale-samples -d 'Pages of each of the other two regions the device reads through the physical addresses recorded before phase 1 (no-IOMMU only)' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l dma-mask-bits -d 'Width of edu\'s DMA mask: 28 is QEMU\'s default; `cargo xtask` starts edu with `dma_mask=0xffffffffff` (40). No-IOMMU DMA goes to physical addresses, which are usually above 256 MiB' -r
complete -c numapin -n "__fish_numapin_using_subcommand demo" -l json -d 'Print one JSON document with every figure instead of the story'
complete -c numapin -n "__fish_numapin_using_subcommand demo" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand status" -l socket -d 'The daemon\'s socket' -r -F
complete -c numapin -n "__fish_numapin_using_subcommand status" -l json -d 'Print JSON instead of text'
complete -c numapin -n "__fish_numapin_using_subcommand status" -s h -l help -d 'Print help'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "topology" -d 'Online NUMA nodes: CPUs, memory, hugepage pools, distances between nodes, and the PCI devices local to each'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "bind" -d 'Bind a PCI device to vfio-pci (driver_override), remembering its driver. Refuses a device the host is using (an interface that is up or routed, a mounted, held or swap block device, the boot display) unless --force; rolls back to the old driver if a step fails'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "unbind" -d 'Give a PCI device back to the driver it had before `numapin bind`. Refuses while a process holds its VFIO group or cdev open (the kernel would block the unbind until it lets go), unless --force; --wait polls for the holders to go before writing anything'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "info" -d 'The device\'s NUMA node and local CPUs, how near each node\'s memory is, its IOMMU group, container kind, IOVA ranges, page sizes and DMA mappings available'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "check" -d 'Preflight: IOMMU, vfio-pci, the device\'s group, the regions against the topology, memlock, hugepages, io_uring, NUMA balancing; each with a fix. Exits 5 (device state) when a check fails'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "pin" -d 'Allocate node-local memory, pin it through the device\'s container, print where it is, and hold the pins until a signal or timeout: a check and a reservation tool (programs use the library)'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "demo" -d 'The original failure re-enacted: mlocked, plain and numapin-pinned memory through NUMA balancing, a migration storm and compaction, with device DMA checks (needs QEMU\'s edu device: `cargo xtask demo`)'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "status" -d 'numapind\'s regions, usage per user and node, DMA mappings left'
complete -c numapin -n "__fish_numapin_using_subcommand help; and not __fish_seen_subcommand_from topology bind unbind info check pin demo status help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
