"""Running a command: load, calibrate, call the method's verb, evaluate, write the run folder.

One module per subcommand. `s2d.cli` parses arguments into configs and calls these; nothing below this layer
loads a model from a name, evaluates, reports or writes a run folder on a method's behalf.
"""
