"""Build the Cython hot path: fastpath (router, balancer) and shared_state (arena).

Set RINGGATE_CYTHON_DEBUG=1 to compile the debug checks in (bounds checks and
the `DEBUG` invariant assertions guarded in the .pyx files).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("RINGGATE_CYTHON_DEBUG") == "1"

# RINGGATE_DEBUG is a C macro the .pyx files read through `cdef extern`, so the
# invariant checks cost nothing in a normal build.
MACROS = [("RINGGATE_DEBUG", "1" if DEBUG else "0")]

extensions = [
    Extension("fastpath.router", ["fastpath/router.pyx"], define_macros=MACROS),
    Extension("fastpath.balancer", ["fastpath/balancer.pyx"], define_macros=MACROS),
    Extension("shared_state.arena", ["shared_state/arena.pyx"], define_macros=MACROS),
    Extension("shared_state.shdict", ["shared_state/shdict.pyx"], define_macros=MACROS),
    Extension("shared_state.series", ["shared_state/series.pyx"], define_macros=MACROS),
    Extension("shared_state.health", ["shared_state/health.pyx"], define_macros=MACROS),
    Extension("workers.proxy", ["workers/proxy.pyx"], define_macros=MACROS),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
