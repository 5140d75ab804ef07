"""Runs a script given as the first argument after PeerSet's ``--name NAME --out OUT`` (which it drops)."""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    _name_flag, _name, _out_flag, _out, script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
