from django.db import models


class Template(models.Model):
    """A document template a tenant set up; setting one up is billed."""

    tenant_id = models.CharField(max_length=128)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
