from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from example_project.django_site.accounts.models import User


@admin.register(User)
class TenantUserAdmin(UserAdmin):
    list_display = ("username", "tenant_id", "is_staff")
    fieldsets = (*UserAdmin.fieldsets, ("Billing", {"fields": ("tenant_id",)}))
