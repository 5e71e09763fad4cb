// Command kstatus prints what kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status, the library
// Flux and kpt read health with) computes for Kubernetes objects given on stdin.
//
// Input: one JSON or YAML object, or a YAML stream of several (separated by "---").
// Output: one JSON line per object, in order: {"status": "Current", "message": "..."}, or
// {"error": "..."} when Compute refuses the object.
//
// There is no upstream CLI that reads offline objects; this is the smallest main around
// status.Compute. Numbers are decoded as int64 (as client-go's decoder does), because kstatus
// reads metadata.generation and status.observedGeneration with NestedInt64.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	decoder := utilyaml.NewYAMLOrJSONDecoder(bufio.NewReader(os.Stdin), 4096)
	out := json.NewEncoder(os.Stdout)
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return
			}
			fmt.Fprintln(os.Stderr, "kstatus: reading stdin:", err)
			os.Exit(2)
		}
		if len(raw) == 0 || string(raw) == "null" {
			continue
		}
		// UnmarshalJSON on Unstructured turns JSON numbers into int64 where they are integral.
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(raw); err != nil {
			_ = out.Encode(result{Error: err.Error()})
			continue
		}
		res, err := status.Compute(obj)
		if err != nil {
			_ = out.Encode(result{Error: err.Error()})
			continue
		}
		_ = out.Encode(result{Status: res.Status.String(), Message: res.Message})
	}
}
