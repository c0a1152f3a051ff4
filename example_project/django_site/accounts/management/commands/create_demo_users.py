from typing import Any

from django.core.management.base import BaseCommand

from example_project.django_site.accounts.models import User

DEMO_PASSWORD = "demo-password"
DEMO_USERS = (("alice", "acme"), ("bob", "globex"), ("carol", "initech"))


class Command(BaseCommand):
    help = "Create the demo users (one per tenant) and an 'admin' superuser."

    def handle(self, *args: Any, **options: Any) -> None:
        for username, tenant in DEMO_USERS:
            user, _ = User.objects.get_or_create(username=username)
            user.tenant_id = tenant
            user.set_password(DEMO_PASSWORD)
            user.save()
        admin, _ = User.objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        admin.tenant_id = "acme"
        admin.set_password(DEMO_PASSWORD)
        admin.save()
        names = ", ".join(f"{u} ({t})" for u, t in DEMO_USERS)
        self.stdout.write(f"users {names} and admin, password {DEMO_PASSWORD!r}")
