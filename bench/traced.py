"""Run a bench script with a Python stack dump every N seconds, to see where a run on a lent machine spends its time
when it prints nothing (loading, compiling, timing). Not a test.

    python bench/traced.py 30 bench/sampling.py --size 0.6b --dtype bfloat16
"""

import faulthandler
import os
import runpy
import sys

if __name__ == "__main__":
    every, script = float(sys.argv[1]), sys.argv[2]
    faulthandler.dump_traceback_later(every, repeat=True)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
