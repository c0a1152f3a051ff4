#!/usr/bin/env python
"""Django's command-line utility for the example site.

python example_project/django_site/manage.py migrate
python example_project/django_site/manage.py create_demo_users
python example_project/django_site/manage.py runserver 8000
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # The site's modules live in the example_project package at the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
