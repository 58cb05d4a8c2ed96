"""The parts of `meshd run`, one owner per long-lived loop (meshd/daemon.py composes them).

    sources.py   the services file and etcd: each publishes its latest snapshot and wakes sync
    sync.py      desired state -> reconciler, retried with backoff; counters pruned in turn
    health.py    progress of syncs: READY, the systemd watchdog, liveness figures
    tcwire.py    tc LB attach/detach and the node-address watch
    exporter.py  the Prometheus HTTP server (start, stop, re-listen on reload)
    reload.py    SIGHUP: which keys change live and which need a restart
    lock.py      one daemon per instance (flock)
    status.py    the status file `meshd services` reads
    supervise.py every task is supervised: an exception is logged, counted, and the task
                 restarted with backoff -- never a silent death while the process lives on
"""
