"""The stage contract (DESIGN.md section 7): a stage apart from the process that runs it.

A stage is a library object that takes records, gives records and says when it is next
due. Clock time is an argument (``now``, integer ns), never read by the stage itself:

    stage.take(items, now)   records in, in order: packets as (ts, data) tuples (what
                             StreamParser.feed(mode=AS_PKT) gives), any other record as a
                             dict (passed on untouched, in its place)
    stage.next_due()         the clock time (ns) at which run_due() has work to do, or None
                             (only more input gives it some)
    stage.run_due(now)       do what is due by now; records out go to the stage's output
    stage.finish(now)        the input is over (or cut short): what was taken but is not
                             due yet is dropped
    stage.settled(now)       nothing more is worth waiting for (all work done, or only
                             work that cannot finish by itself)
    stage.close(now)         end what is left now (its last records go out)

A stage with descriptors of its own (socket mode's connections to the target) adds:

    stage.fileno()           one descriptor, readable when those have events (an epoll
                             set); the runner watches it beside its own
    stage.on_ready(now)      handle those events (the runner calls it when fileno() is
                             readable)

Records out go to the stage's output object, which the stage is built with; a pipe-stage
writes them to a RecordWriter, and a chain of stages in one process would hand them to the
next stage's take(). A runner drives one stage from file descriptors, the way the shell
pipeline runs it (one process per stage); its clock, its poll and its descriptors are
arguments, so that a test runs the stage without a process, with a fake clock and
in-memory files. (The one-process chain itself is not built yet; tc-pace and tc-readpcap
have runners with the same injectable clock and I/O, not yet stages of this shape:
tc-readpcap is a source, and tc-pace waits by sleeping.)
"""
