"""``pdp snapshot impact``: replay audit logs against a candidate snapshot.

The package's files are its stages:

- :mod:`~pdp.impact.records`: reading logs (rotated, gzip, damaged) into
  recorded decisions, counting what cannot be replayed;
- :mod:`~pdp.impact.snapshots`: finding the policy each record names;
- :mod:`~pdp.impact.flips`: what a flip is, whom it is owed to, the boundary
  check (shared with the live candidate, :mod:`pdp.candidate`);
- :mod:`~pdp.impact.replay`: deciding every record again and counting flips;
- :mod:`~pdp.impact.report` and :mod:`~pdp.impact.render`: the report as one
  document, then Markdown, CSV, JSON and a PNG chart;
- :mod:`~pdp.impact.command`: the command line.
"""
