"""The `migrate` command: verbs -> calls, errors -> one line and an exit code, results -> tables or JSON."""

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from runtime import criulogs, linux
from runtime.container import RunRequest, Runtime
from runtime.errors import InDoubt, InvalidInput, MigrateError, NotFound
from runtime.image_catalog import Images
from runtime.paths import INTERNAL_ERRORS, StateRoot
from runtime.reconcile import unsupervised
from runtime.snapshots import Snapshots
from runtime.spec import DRAIN_POLICIES, Schedule, parse_duration, parse_size, validate_name

from . import output
from .preflight import MODES

EPILOG = """exit codes: 0 ok, 1 failure, 2 bad input, 3 not found, 4 conflict with current state,
5 bad image, 6 CRIU failure, 7 remote host failure, 8 migration failed and rolled back,
9 in doubt: a migration's target could not be asked whether it committed (see migrate recover),
10 drain incomplete: containers stay on the drained host (the table says why)"""


VERBS = ("image", "run", "ps", "inspect", "logs", "exec", "stop", "rm", "checkpoint", "schedule", "snapshots",
         "snapshot", "restore", "export", "import", "move", "drain", "recover", "agent")
# what a container under a (scheduled) snapshot waits for rather than refuses
DIRECT_HELP = ("memory pages go by a direct TCP connection, unencrypted (for a trusted network: faster than "
               "through SSH); the host's `direct = true` in the config does the same")
SSH_CONFIG_HELP = "ssh config file, given to ssh as -F (default: MIGRATE_SSH_CONFIG, else ssh's own files)"
WAIT_FOR_SNAPSHOT = ("exec", "stop", "rm", "restore")  # checkpoint and move wait as they take it


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"migrate: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="migrate",
        usage="migrate NAME HOST [--mode auto|copy|precopy|lazy] [--json]\n       migrate COMMAND ...",
        description="Run containers, checkpoint and restore them, and move them live between hosts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", prog="migrate")

    image = sub.add_parser("image", help="import, list and remove images").add_subparsers(dest="image_verb",
                                                                                             metavar="ACTION")
    imp = image.add_parser("import", help="import a docker-archive, oci-archive or OCI layout")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", help="NAME[:TAG] to give the image (default: from the archive)")
    ils = image.add_parser("ls", help="list images")
    ils.add_argument("--json", action="store_true")
    irm = image.add_parser("rm", help="remove an image (refused while a container uses it)")
    irm.add_argument("name")

    run = sub.add_parser("run", help="start a detached container")
    run.add_argument("--name", required=True)
    run.add_argument("--memory", type=parse_size, help="memory limit, e.g. 512m")
    run.add_argument("--cpus", type=float, help="CPU limit, e.g. 0.5")
    run.add_argument("--pids", type=int, help="at most this many processes and threads")
    run.add_argument("--drain-policy", choices=DRAIN_POLICIES,
                     help="what `migrate drain` does with it: move it live, checkpoint it here, or stop it "
                          "(default: drain's --policy)")
    run.add_argument("--checkpoint-every", type=parse_duration, metavar="DURATION",
                     help="take a snapshot of it every DURATION while it runs (e.g. 10m; it runs on)")
    run.add_argument("--keep", type=int, metavar="N", help="with --checkpoint-every: keep the newest N (default 3)")
    run.add_argument("--privileged", action="store_true",
                     help="not confined: every capability, no seccomp filter, /proc unmasked, setuid files work")
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    run.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CT[:ro]")
    run.add_argument("-w", "--workdir", metavar="DIR")
    run.add_argument("image")
    run.add_argument("command", nargs=argparse.REMAINDER)

    ps = sub.add_parser("ps", help="list containers")
    ps.add_argument("--json", action="store_true")

    ins = sub.add_parser("inspect", help="everything known of one container, as JSON")
    ins.add_argument("name")

    sch = sub.add_parser("schedule", help="take snapshots of a container on time (or stop doing so)")
    sch.add_argument("name")
    when = sch.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", type=parse_duration, metavar="DURATION", help="a snapshot every DURATION (e.g. 30s, 10m, 1h)")
    when.add_argument("--off", action="store_true", help="no more scheduled snapshots (those taken are kept)")
    sch.add_argument("--keep", type=int, metavar="N", help="keep the newest N scheduled snapshots (default 3)")

    logs = sub.add_parser("logs", help="print a container's output (or the CRIU log of its last failure)")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--criu", action="store_true",
                      help="print instead the newest CRIU log this host kept of a failed dump, restore or lazy "
                           "page transfer of NAME (in MIGRATE_ROOT/criu-logs: the newest 10 per container, "
                           "kept after rm)")
    logs.add_argument("name")

    ex = sub.add_parser("exec", help="run a command inside a running container")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    ex.add_argument("name")
    ex.add_argument("command", nargs=argparse.REMAINDER)

    stop = sub.add_parser("stop", help="stop a container: SIGTERM, then SIGKILL")
    stop.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS")
    stop.add_argument("name")

    rm = sub.add_parser("rm", help="remove a container")
    rm.add_argument("-f", "--force", action="store_true", help="stop it first if it runs")
    rm.add_argument("name")

    cp = sub.add_parser("checkpoint", help="snapshot a running container (and stop it)")
    cp.add_argument("--leave-running", action="store_true")
    cp.add_argument("--tag")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("name")

    sn = sub.add_parser("snapshots", help="list snapshots")
    sn.add_argument("--json", action="store_true")
    sn.add_argument("name", nargs="?")

    snap = sub.add_parser("snapshot", help="manage snapshots").add_subparsers(dest="snapshot_verb",
                                                                               metavar="ACTION")
    srm = snap.add_parser("rm", help="remove a snapshot")
    srm.add_argument("id")

    mv = sub.add_parser("move", help="move a running container live to another host (same as: migrate NAME HOST)")
    mv.add_argument("name", help="the running container to move")
    mv.add_argument("host", help="a host as `ssh HOST` knows it (resolved by `ssh -G`)")
    mv.add_argument("--mode", choices=MODES, default="auto",
                    help="copy: freeze, copy everything, restore; precopy: copy memory while it runs, then "
                         "freeze for what changed; lazy: restore at once, memory follows; auto: precopy, else "
                         "lazy, else copy, as both hosts support")
    mv.add_argument("--ssh-config", help=SSH_CONFIG_HELP)
    mv.add_argument("--json", action="store_true", help="print the statistics as JSON")
    mv.add_argument("--direct", action="store_true", help=DIRECT_HELP)
    mv.add_argument("--tcp-close", action="store_true",
                    help="move even with TCP connections to outside the container: they are closed on the target")
    mv.add_argument("--allow-new-inodes", action="store_true",
                    help="move even with SQLite databases open in the container's own filesystem "
                         "(their files get new inode numbers there, and SQLite may refuse to write)")

    mv.add_argument("--freeze-timeout", type=float, default=None, metavar="SECONDS",
                    help="the longest the container may stay frozen here before the move is rolled back "
                         "(default 120)")

    dr = sub.add_parser("drain", help="empty a host: move its running containers live to other hosts (or "
                                      "checkpoint or stop them, as their drain policy says)")
    dr.add_argument("host", help="the host to empty: this one (its hostname, or localhost), or another, reached "
                                 "over ssh, where the drain then runs")
    dr.add_argument("--to", required=True, metavar="HOST1,HOST2,...",
                    help="the hosts to move containers to, as HOST's ssh config names them")
    dr.add_argument("--parallel", type=int, metavar="N", help="at most N containers at once (default 1)")
    dr.add_argument("--policy", choices=DRAIN_POLICIES,
                    help="for containers run without --drain-policy (default live); their own policy wins")
    dr.add_argument("--dry-run", action="store_true", help="print the placement, change nothing")
    dr.add_argument("--json", action="store_true")
    dr.add_argument("--ssh-config", help=SSH_CONFIG_HELP)
    dr.add_argument("--direct", action="store_true", help=DIRECT_HELP)

    rc = sub.add_parser("recover", help="settle what interrupted migrations left undecided here, asking their "
                                        "other hosts (containers in-doubt run again here or are removed)")
    rc.add_argument("name", nargs="?", help="only this container")
    rc.add_argument("--ssh-config", help=SSH_CONFIG_HELP)
    rc.add_argument("--json", action="store_true")

    sub.add_parser("agent", help="(internal) the remote side of a migration, spoken to over SSH")

    ex = sub.add_parser("export", help="write a snapshot into one archive file, to import on another host",
                        description="Write a snapshot (CRIU images, upper dir, spec, log; with --with-image the "
                                    "image's layers) into one zstd-compressed archive with a sha256 per member "
                                    "(docs/archive.md). The file is root-only: it holds process memory.")
    ex.add_argument("ref", metavar="NAME|SNAPSHOT",
                    help="a snapshot id, or a container: its newest snapshot (a running container without any "
                         "gets a leave-running checkpoint first)")
    ex.add_argument("--snapshot", metavar="ID|TAG", help="with NAME: this snapshot of it")
    ex.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the archive to write")
    ex.add_argument("--with-image", action="store_true",
                    help="carry the image's layers too, for a host that lacks the image")

    im = sub.add_parser("import", help="register the snapshot of an archive made by `migrate export`",
                        description="Check the archive (every member's sha256, the manifest's own) and this host "
                                    "(CRIU as new, same architecture, a CPU CRIU accepts, the image or the layers "
                                    "the archive carries, free space) before anything is written; then register "
                                    "the snapshot. A damaged archive is refused (exit 5) and leaves nothing.")
    im.add_argument("file", type=Path, metavar="FILE")
    im.add_argument("--name", dest="new_name", metavar="NEW", help="register it as a snapshot of this container name")
    im.add_argument("--start", action="store_true", help="restore it at once (as `migrate restore` would)")

    rs = sub.add_parser("restore", help="bring a checkpointed container back, running")
    rs.add_argument("--snapshot", metavar="ID|TAG", help="default: the latest snapshot")
    rs.add_argument("--name", dest="new_name", help="restore as a new container")
    rs.add_argument("--tcp-close", action="store_true",
                    help="bring connections to outside the container back closed (their peers are gone)")
    rs.add_argument("--all", action="store_true",
                    help="every lost container that has a snapshot (at boot: see the README's migrate-restore.service)")
    rs.add_argument("name", nargs="?")
    return p


def _image_cmd(rt: Runtime, a) -> int:
    images = Images(rt)
    if a.image_verb == "import":
        rec = images.import_(a.path, a.name)
        output.out.print(f"imported {rec.name} {rec.id[:19]} ({len(rec.layers)} layers, {output.human_size(rec.size)})")
    elif a.image_verb == "ls":
        recs = images.list()
        if a.json:
            output.print_json([{"name": r.name, "id": r.id, "layers": list(r.layers), "size": r.size,
                                "created": r.created} for r in recs])
        else:
            output.print_table(("NAME", "ID", "LAYERS", "SIZE", "CREATED"),
                               [(r.name, r.id[7:19], len(r.layers), output.human_size(r.size),
                                 output.human_age(r.created)) for r in recs])
    elif a.image_verb == "rm":
        images.remove(a.name)
    else:
        raise InvalidInput("usage: migrate image {import,ls,rm} ...")
    return 0


def _ps(rt: Runtime, a) -> int:
    rows = [_summary(rt, r, (rt.catalog.own_snapshots(r) or [None])[-1]) for r in rt.catalog.containers()]
    if a.json:
        output.print_json(rows)
    else:
        output.print_table(
            ("NAME", "STATE", "IMAGE", "PID", "STARTED", "MEMORY", "SNAPSHOT"),
            [(r["name"] + (" (privileged)" if r["privileged"] else ""), _state_text(r), r["image"], r["pid"],
              output.human_age(r["started"]), output.human_size(r["memory"]), _snapshot_text(r)) for r in rows],
        )
    return 0


def _summary(rt: Runtime, rec, newest) -> dict:
    """What ps shows of a container (and inspect begins with)."""
    schedule = rec.spec.schedule
    return {"name": rec.name, "state": _shown_state(rec), "image": rec.spec.image, "pid": rec.pid,
            "started": rec.started, "memory": rt.usage(rec), "exit_code": rec.exit_code,
            "owner": (rec.owner or {}).get("pid"), "privileged": rec.spec.privileged,
            "schedule": {"every": schedule.every, "keep": schedule.keep} if schedule else None,
            "last_snapshot": {"id": newest.id, "created": newest.created} if newest else None}


def _snapshot_text(row: dict) -> str:
    """`12s ago (every 10m)`: the newest snapshot's age and the schedule, if any."""
    last = row["last_snapshot"]
    text = output.human_age(last["created"]) if last else "-"
    if row["schedule"]:
        text += f" (every {output.human_duration(row['schedule']['every'])})"
    return text


def _inspect(rt: Runtime, a) -> int:
    rec = rt.catalog.container(a.name)
    snaps = rt.catalog.own_snapshots(rec)
    info = _summary(rt, rec, snaps[-1] if snaps else None)
    info.update(spec=json.loads(rec.spec.to_json()), shim_pid=rec.shim_pid, cgroups=rec.cgroups,
                created=rec.created, finished=rec.finished, migration=rec.migration,
                restored_from=rec.restored_from, snapshots=[_snapshot_json(s) for s in snaps])
    if info["last_snapshot"]:
        info["last_snapshot"]["age"] = round(time.time() - info["last_snapshot"]["created"], 3)
    output.print_json(info)
    return 0


def _schedule(rt: Runtime, a) -> int:
    if a.keep is not None and a.off:
        raise InvalidInput("--keep goes with --every, not --off")
    rec = rt.set_schedule(a.name, None if a.off else _schedule_of(a.every, a.keep))
    schedule = rec.spec.schedule
    output.out.print(f"{rec.name}: no scheduled snapshots" if schedule is None else
                     f"{rec.name}: a snapshot every {output.human_duration(schedule.every)}, "
                     f"the newest {schedule.keep} kept")
    return 0


def _schedule_of(every: float | None, keep: int | None) -> Schedule | None:
    if every is None:
        if keep is not None:
            raise InvalidInput("--keep goes with --checkpoint-every")
        return None
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    return Schedule(every=every) if keep is None else Schedule(every=every, keep=keep)


def _state_text(row: dict) -> str:
    """`exited (CODE)`, `migrating (by pid N)`: the state with what a user asks next."""
    if row["state"] == "exited" and row["exit_code"] is not None:
        return f"exited ({row['exit_code']})"
    if row["owner"]:
        return f"{row['state']} (by pid {row['owner']})"
    return row["state"]


def _shown_state(rec) -> str:
    """The record's state, but `unsupervised` for a running one whose shim died: its processes
    run, nothing logs their output or will record their exit (`stop` ends them)."""
    if unsupervised(rec):
        return "unsupervised"
    return rec.state


def _snapshot_json(s) -> dict:
    return {"id": s.id, "container": s.container, "tag": s.tag, "created": s.created, "size": s.size,
            "criu_version": s.criu_version, "image": s.spec.image, "scheduled": s.scheduled, "pause": s.pause}


def _snapshots(rt: Runtime, a) -> int:
    snaps = Snapshots(rt).list(a.name)
    if a.json:
        output.print_json([_snapshot_json(s) for s in snaps])
    else:
        output.print_table(("ID", "CONTAINER", "TAG", "CREATED", "SIZE", "PAUSED"),
                           [(s.id, s.container, s.tag or ("(scheduled)" if s.scheduled else None),
                             output.human_age(s.created), output.human_size(s.size), output.human_duration(s.pause))
                            for s in snaps])
    return 0


def _restore(rt: Runtime, a) -> int:
    snapshots = Snapshots(rt)
    if not a.all:
        if a.name is None:
            raise InvalidInput("restore needs a container NAME, or --all")
        rec = snapshots.restore(a.name, a.snapshot, a.new_name, tcp_close=a.tcp_close)
        output.out.print(f"{rec.name} running (pid {rec.pid})")
        return 0
    if a.name is not None or a.snapshot is not None or a.new_name is not None:
        raise InvalidInput("restore --all takes no NAME, --snapshot or --name")
    failed = 0
    lost = snapshots.lost_with_snapshot()
    for name in lost:
        try:
            rec = snapshots.restore(name, tcp_close=a.tcp_close)
        except MigrateError as e:
            failed += 1
            output.print_error(f"{name}: {e}")
        else:
            output.out.print(f"{rec.name} running (pid {rec.pid})")
    if not lost:
        output.out.print("no lost container with a snapshot here")
    return 1 if failed else 0


def _archive(rt: Runtime, a) -> int:
    from runtime import archive

    snapshots = Snapshots(rt)
    if a.verb == "export":
        snap, note = archive.resolve(snapshots, a.ref, a.snapshot)
        if note:
            output.print_note(note)
        size = archive.export(snapshots, snap, a.output, a.with_image)
        output.out.print(f"exported snapshot {snap.id} of {snap.container} to {a.output} ({output.human_size(size)})",
                         markup=False)
        return 0
    snap = archive.import_(snapshots, a.file, a.new_name)
    output.out.print(f"imported snapshot {snap.id} of {snap.container}", markup=False)
    if a.start:
        rec = snapshots.restore(snap.container, snap.id)
        output.out.print(f"{rec.name} running (pid {rec.pid})", markup=False)
    return 0


def _recover(rt: Runtime, a) -> int:
    from .recover import recover

    outcomes = recover(rt, a.name, ssh_config=a.ssh_config)
    if a.json:
        output.print_json([{"container": o.container, "peer": o.peer, "result": o.result, "message": o.message}
                           for o in outcomes])
    else:
        for o in outcomes:
            if o.result == "in-doubt":  # still undecided: the one thing here that failed
                output.print_error(o.message)
            else:
                output.out.print(output.printable(o.message), markup=False)
        if not outcomes:
            output.out.print("nothing to recover here")
    return InDoubt.exit_code if any(o.result == "in-doubt" for o in outcomes) else 0


def _criu_log(rt: Runtime, a) -> int:
    """The newest kept CRIU log of NAME; the container itself may be gone (moved, removed)."""
    if a.follow:
        raise InvalidInput("logs --criu prints a finished log: it cannot follow (-f)")
    log = criulogs.newest(rt.root, validate_name(a.name))
    try:
        data = log.read_bytes() if log is not None else None
    except FileNotFoundError:  # pruned by a newer failure meanwhile
        data = None
    if data is None:
        raise NotFound(f"no CRIU log of a failed dump or restore of {a.name} is kept on this host")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def dispatch(a) -> int:
    rt = Runtime()
    try:
        if a.verb != "agent":  # the records of this host tell the truth before anything acts on them
            for note in rt.reconcile():
                output.print_note(note)
        if a.verb in WAIT_FOR_SNAPSHOT and getattr(a, "name", None):
            rt.await_snapshot(a.name)
        if a.verb == "image":
            return _image_cmd(rt, a)
        if a.verb == "run":
            rec = rt.run(RunRequest(name=a.name, image=a.image, command=tuple(a.command), env=tuple(a.env),
                                    volumes=tuple(a.volume), working_dir=a.workdir, memory=a.memory, cpus=a.cpus,
                                    pids=a.pids, schedule=_schedule_of(a.checkpoint_every, a.keep),
                                    drain_policy=a.drain_policy, privileged=a.privileged))
            output.out.print(rec.name)
            return 0
        if a.verb == "ps":
            return _ps(rt, a)
        if a.verb == "inspect":
            return _inspect(rt, a)
        if a.verb == "schedule":
            return _schedule(rt, a)
        if a.verb == "logs":
            if a.criu:
                return _criu_log(rt, a)
            rt.follow_log(a.name, sys.stdout.buffer, a.follow)
            return 0
        if a.verb == "exec":
            return rt.exec(a.name, a.command, tuple(a.env))
        if a.verb == "stop":
            rec = rt.stop(a.name, a.time)
            output.out.print(f"{rec.name} exited ({rec.exit_code})")
            return 0
        if a.verb == "rm":
            rt.remove(a.name, a.force)
            return 0
        if a.verb == "checkpoint":
            snap = Snapshots(rt).checkpoint(a.name, a.leave_running, a.tag)
            if a.json:
                output.print_json({"id": snap.id, "container": snap.container, "tag": snap.tag, "size": snap.size})
            else:
                output.out.print(snap.id)
            return 0
        if a.verb == "snapshots":
            return _snapshots(rt, a)
        if a.verb == "snapshot":
            if a.snapshot_verb != "rm":
                raise InvalidInput("usage: migrate snapshot rm ID")
            Snapshots(rt).remove(a.id)
            return 0
        if a.verb == "move":
            from .controller import Migration  # slow to import (CRIU, rich): only where it is needed

            if a.freeze_timeout is not None and a.freeze_timeout <= 0:
                raise InvalidInput("--freeze-timeout must be positive")
            extra = {"freeze_timeout": a.freeze_timeout} if a.freeze_timeout is not None else {}
            stats = Migration(rt, a.name, a.host, a.mode, ssh_config=a.ssh_config, tcp_close=a.tcp_close,
                              allow_new_inodes=a.allow_new_inodes, direct=a.direct, **extra).run()
            if a.json:
                output.print_json(stats.to_json())
            else:
                output.out.print(f"{a.name} now runs on {a.host}")
                stats.print()
            return 0
        if a.verb == "drain":
            from . import drain

            return drain.run(rt, a.host, a.to, parallel=a.parallel, policy=a.policy, dry_run=a.dry_run,
                             as_json=a.json, ssh_config=a.ssh_config, direct=a.direct)
        if a.verb == "recover":
            return _recover(rt, a)
        if a.verb == "agent":
            from .agent import serve

            return serve()
        if a.verb == "restore":
            return _restore(rt, a)
        if a.verb in ("export", "import"):
            return _archive(rt, a)
        raise InvalidInput("no command given: see migrate --help")
    finally:
        rt.close()


def _with_default_verb(argv: list[str]) -> list[str]:
    """`migrate NAME HOST` is `migrate move NAME HOST`: the main job gets the shortest form."""
    positional = [a for a in argv if not a.startswith("-")]
    if len(positional) >= 2 and not argv[0].startswith("-") and argv[0] not in VERBS:
        return ["move", *argv]  # a lone unknown word stays an unknown command
    return argv


def _interrupted(_signum, _frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # a dropped SSH login (SIGHUP) or a `kill` (SIGTERM) unwinds like Ctrl-C: whatever was
    # begun is rolled back on the way out (a migration resumes its source, the agent undoes)
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(_with_default_verb(argv))
        if os.geteuid() != 0 and args.verb is not None:
            output.err.print("migrate: error: must run as root (namespaces, mounts and CRIU need it)")
            return 2
        return dispatch(args)
    except MigrateError as e:  # (also raised by a type= converter such as parse_size)
        output.print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        output.err.print("migrate: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        gone = [s for s in (sys.stdout, sys.stderr) if isinstance(e, BrokenPipeError) and linux.reader_gone(s)]
        if gone:
            for stream in gone:
                linux.detach(stream)
            return 141  # as a tool that SIGPIPE ended: its reader stopped reading (`migrate ps | head`)
        if os.environ.get("MIGRATE_DEBUG"):
            traceback.print_exc()
        kept = _keep_traceback(argv)
        where = f"the traceback is in {kept}" if kept else "set MIGRATE_DEBUG=1 for details"
        output.err.print(f"migrate: internal error: {type(e).__name__}: {output.printable(str(e))} ({where})",
                         markup=False)
        return 1


def _keep_traceback(argv: list[str]) -> Path | None:
    """An internal error is a bug, and often one of a rare moment: its traceback is appended to
    INTERNAL_ERRORS in the state root (the newest ~1 MB), so it can be reported after the fact."""
    path = StateRoot.from_env().root / INTERNAL_ERRORS
    try:
        if path.stat().st_size > 1 << 20:
            path.replace(path.with_name(path.name + ".old"))
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: migrate "
                    f"{' '.join(argv)}\n{traceback.format_exc()}")
        return path
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
