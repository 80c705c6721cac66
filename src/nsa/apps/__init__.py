"""Applications built on the library: the command line, training, the needle evaluation and the
benchmarks. Nothing in the library (``nsa.ops``, ``nsa.layer``, ``nsa.model``, ...) imports this
package."""
