"""``hexray debug``: gdb's verbs over a recorded forward pass (session.py), as commands (commands.py) in a REPL or a script (repl.py)."""
