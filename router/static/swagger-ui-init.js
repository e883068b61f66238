// Swagger UI over this gateway's own OpenAPI document. A file of its own, not an inline
// script, so that the page's Content-Security-Policy can be script-src 'self'.
// The document's URL is relative to the page (/swagger-ui -> /openapi.json), so the page
// works under a route prefix and behind TLS as it does on a plain port.
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  // Its default asks a public validator for a badge: nothing leaves this origin.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
