"""The communication layer: process-group setup, communicate(), sync strategies and the
communication study (collectives tour, ring all-reduce, tracer, benchmark)."""
