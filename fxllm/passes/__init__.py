"""FX passes over the captured graph, run in a fixed order by the pass manager."""
