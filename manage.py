#!/usr/bin/env python3
"""Django's command-line utility for the RQ Ops Portal."""
import faulthandler
import os
import signal
import sys


def main():
    # `kill -USR2 PID` prints the stack of every thread of a running command (a worker that does not exit, a command
    # that hangs) to its standard error, and the command goes on.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
