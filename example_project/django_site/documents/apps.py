from django.apps import AppConfig


class DocumentsConfig(AppConfig):
    name = "example_project.django_site.documents"
    label = "documents"
