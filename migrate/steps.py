"""The steps of a migration, as data: what each does, whether the source is frozen during it,
who owns the container once it is done, and what undoes it (or what `migrate recover` does
when a process died there). The controller journals these names; the README's account of a
migration is `python -m migrate.steps`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    does: str
    frozen: bool
    owner: str  # who owns the container once the step is done
    undo: str  # how a failure in it, or the death of a process during it, is undone


STEPS = (
    Step("preflight", "both hosts' facts compared: CRIU, kernel, CPU, free space, name, ports, holdings",
         False, "source", "nothing to undo"),
    Step("prepare", "the target makes its incoming folder (with an owner file naming its agent)",
         False, "source", "the agent removes it; if the agent died, the next command on the target does"),
    Step("layers", "the blobs of the image layers the target lacks, rsynced into staging; the target verifies "
         "each against its digest and extracts it (a mismatch fails the step)",
         False, "source", "the layers this migration brought are removed unless something uses them"),
    Step("upper sync", "the container's own files, rsynced while it runs",
         False, "source", "the incoming folder is removed"),
    Step("preload", "the target writes the record and starts a fenced shim, idle",
         False, "source", "the record is removed, the shim told to exit"),
    Step("pre-copy", "pre-copy mode: rounds of pre-dumps send the memory dirtied since the round before to a "
         "page server on the target, while the container runs",
         False, "source", "the target's page server and rounds go with its incoming folder"),
    Step("page connection", "a socket between the two hosts' CRIUs through the SSH connection (unix sockets only "
         "root can reach at both ends, no TCP port), or with `--direct` a TCP connection the target's agent makes "
         "to the source, which keeps it only if it brings the migration's one-time token: in copy and pre-copy mode a page server on the target takes "
         "the memory as the final dump writes it; in lazy mode the target keeps it for its lazy-pages daemon",
         False, "source", "the connection is closed; a page server goes with the incoming folder"),
    Step("checkpoint", "CRIU dumps the container, its memory straight to the target (but in lazy mode); from "
         "here the source is frozen",
         True, "source", "CRIU resumes the source; if the controller died, the next command here does"),
    Step("final sync", "CRIU's other images, the files changed since the upper sync began and the log, in one "
         "message to the agent (one rsync run when they pass 2 MiB)",
         True, "source", "as checkpoint"),
    Step("restore", "the target restores; its copy runs fenced (killed if its agent goes, or if no "
         "commit arrives within the freeze deadline)",
         True, "source", "the target's copy is ended (by the agent, its fence or its deadline) before the "
         "source resumes"),
    Step("memory pages", "lazy mode: the target's copy runs and fetches the memory it touches; the rest streams. "
         "CRIU lets the source go when done, but its cgroup freezer holds it from the checkpoint on",
         True, "source", "the target's copy is killed (it must not run without its pages); then the source is "
         "thawed"),
    Step("commit", "the source is frozen by its cgroup too; the target checks its copy, writes `committed` "
         "in its journal (durable) and tells its shim",
         True, "target", "a lost answer is asked for again on a new connection; if the target cannot be "
         "reached, the source stays frozen (`in-doubt`) until `migrate recover` learns the outcome"),
    Step("cleanup", "the source's tree ends (CRIU ends it; in lazy mode it is killed); its record, folders, "
         "mounts and cgroups go",
         False, "target", "`migrate recover` (or the next command here) finishes it"),
)
NAMES = frozenset(s.name for s in STEPS)


def markdown() -> str:
    rows = ["| step | what happens | source frozen | owner after | if it fails or a process dies |",
            "|---|---|---|---|---|"]
    rows += [f"| {s.name} | {s.does} | {'yes' if s.frozen else 'no'} | {s.owner} | {s.undo} |" for s in STEPS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
