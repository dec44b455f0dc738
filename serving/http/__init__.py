"""The HTTP edge: the one front door, its routes and how answers are rendered. The only
package that knows Starlette and FastAPI."""
