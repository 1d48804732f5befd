"""The application: the ``mlmega`` command line, on top of every other package and imported by none."""
