from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A user of one tenant: meter_django's default tenant resolver reads
    ``request.user.tenant_id`` after the view has run."""

    tenant_id = models.CharField(max_length=128, blank=True)
