"""What the demo, the tests and the benchmarks run autorefine on, on one CPU machine.

- `synthetic`, `synthetic_multihop`: made-up QA tasks a ~1M-parameter policy can learn on 2 cores, with
  their corpora, warm-start traces and reports (`data/synthetic*` are built from them).
- `retriever`: run `retriever-server serve` as a child process and always stop it.
- `searchr1_server`: a stand-in that speaks only Search-R1's `POST /retrieve` (no `/health`), to check the
  client against servers other than ours.

It lives outside `autorefine/` because no library module needs it: users install the library and the
retriever; this package is the bench we test them on (it imports them, never the other way round).
"""
