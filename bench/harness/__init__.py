"""What the bench scripts share: starting what they measure, driving it, measuring it.

The scripts are run as `python bench/<script>.py`, which puts bench/ on sys.path, so they
import `from harness.<module> import ...`; a script imports nothing from another script.

    machine       /proc readings: CPU seconds of a process or thread, RSS and other status
                  fields, the machine's busy time, every process's CPU, the busiest
                  outsiders, waiting for a quiet machine; free_port, code_version (the
                  commit of src/ being measured)
    meter         Meter/Load: CPU of the run's processes (PostgreSQL backends included)
                  and of the whole machine over one measured window, and its report lines
    server        one `chat-service serve`: SECRET, server_env (the caller's settings left
                  out, the run's put in), start_server (free port, readiness, log, optional
                  cProfile and taskset pinning, dies with the benchmark), errors, stop
    redis_server  the run's own redis-server
    postgres      a fresh database (created, migrated, dropped) and its backends' pids
    stack         started(...): work directory, database, redis-server, helper processes
                  and servers in order, torn down in reverse whatever happens; Stack knows
                  the run's pids, makes a Meter and lists the servers' problems
    storage       local or moto-S3 blob storage for the file benchmarks (uploads, archive)
    clients       tokens for SECRET, bearer headers, sessions over REST, WebSocket
                  connections proven live by a pong
    tally         Tally: one connection's deliveries checked by seq (received, duplicates,
                  gaps, out of order): `chatservice.tally.SeqTally`, the very check
                  `chat-service loadtest` makes per member; percentiles (nearest rank) are
                  `chatservice.tally.percentile`, as the product's
    probes        a server's peak memory and its /healthz latency while a block runs
    content       seeded message texts as people type them
    report        markdown tables, ranges and medians over repeats
    run           run_async (uvloop), Ctrl-C/SIGTERM handling and exit status (guarded),
                  the options scripts share, the command line as run

A new script:

    from harness.clients import create_session, open_live, token, ws_url
    from harness.run import add_run_args, guarded, run_async
    from harness.stack import started

    def main() -> int:
        parser = argparse.ArgumentParser(description=...)
        add_run_args(parser, "PATH.<server>")
        args = parser.parse_args()

        def body() -> int:
            with started(backend="postgres", keep=args.keep, verbose=args.verbose) as stack:
                report = run_async(measure(stack, args))  # stack.servers[0].base_url, …
                report.problems += stack.problems()
            print(report.text())
            return 0 if report.ok else 1

        return guarded(body, args.verbose)  # 1: a check failed, 2: could not run, 130

Inside `measure`: sessions with `create_session(http, token(user), ...)`, connections
with `open_live(ws_url(...), ...)`, a `Tally` per connection, and `stack.meter()` around
the measured window.
"""
