// The add-card page: Stripe.js tokenizes the card in Stripe's own frame; this page
// posts only the resulting payment method id (pm_...) to the broker.
document.addEventListener("DOMContentLoaded", function () {
  "use strict";
  var form = document.getElementById("add-card");
  if (!form || typeof window.Stripe !== "function") {
    return;
  }
  var stripe = window.Stripe(form.dataset.publishableKey);
  var card = stripe.elements().create("card");
  card.mount("#card-element");
  var errors = document.getElementById("card-errors");
  var button = document.getElementById("save-card");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    button.disabled = true;
    errors.textContent = "";
    stripe
      .confirmCardSetup(form.dataset.clientSecret, { payment_method: { card: card } })
      .then(function (result) {
        if (result.error) {
          errors.textContent = result.error.message;
          button.disabled = false;
          return;
        }
        form.elements.payment_method_id.value = result.setupIntent.payment_method;
        form.submit();
      });
  });
});
